"""Fake quantization for training (QAT): weight grids, the straight-through estimator, Quant modules
and the one verb that applies a recipe's bit widths, :func:`quantize_`.

Weight grid (symmetric, all ``2**n`` levels, one scale ``s`` per output channel or per group):

* ``n < 8`` — *mid-rise*: values ``s * (q + 1/2)`` for ``q`` in ``[-2**(n-1), 2**(n-1) - 1]`` and
  ``s = amax / 2**(n-1)``: the ``2**n`` cells tile ``[-amax, amax]`` and every value is a cell centre.
  (A zero-centred grid wastes a level at 2 bits: 3 usable levels instead of 4.)
* ``n == 8`` — *integer*: values ``s * q`` for ``q`` in ``[-128, 127]``, ``s = amax / 127.5``; zero
  is exact, as int8 kernels expect.
* format ``intz``, any ``n`` — the integer grid at every width: ``s * q`` for ``q`` in
  ``[-2**(n-1), 2**(n-1) - 1]``, ``s = amax / (2**(n-1) - 1/2)``. One level fewer on the positive
  side, but zero is a level: the grid that GGUF's Q4_0/Q8_0 and compressed-tensors' symmetric int
  hold exactly (and identical to ``int`` at 8 bits).

Either way a weight is ``sigma * c`` with an int8 code ``c`` (``2q + 1`` and ``s/2`` for mid-rise,
``q`` and ``s`` for integer), which is how the deploy form runs every width on int8 kernels.
Scales are rounded to float16 inside the forward, because that is how they are stored: the packed
artifact reproduces the fake-quant weights bit for bit.

Activations: ``a_bits = 8`` quantizes a layer's input to int8 levels ``[-127, 127]``, with one
calibrated scale per tensor (``static``) or one scale per token computed at run time (``dynamic``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from compsearch.errors import KernelError
from compsearch.kernels._modules import replace_by_name, transaction
from compsearch.kernels._quant_grid import (  # noqa: F401 - the public names of quantization
    ACT_QMAX,
    FP8_MAX,
    SCALE_MIN,
    QuantSpec,
    _check_bits,
    dequantize_codes,
    fake_quantize,
    fake_quantize_fp8,
    grid,
    grouped,
    is_midrise,
    rows_view,
    spec_from_plan,
    weight_codes,
)
from compsearch.kernels._quant_modules import (  # noqa: F401
    QUANT_TYPES,
    ActQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMixin,
    WeightQuantizer,
    as_class,
    conv1d_class,
    float_forward,
    float_layer,
    is_quantizable,
    original_class,
    own_forward,
    quant_class,
)
from compsearch.kernels._quant_stacked import (
    StackedQuantMixin,
    convert_stacked,
    stacked_params,
)
from compsearch.kernels.formats import get_format, weight_scale  # noqa: F401
from compsearch.recipes.schema import FLOAT_BITS, GROUP_SIZES, LayerPlan, Recipe

# -- quantize_ -------------------------------------------------------------------------------------


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the spec of every quantized layer, and every layer it skipped."""

    quantized: dict[str, QuantSpec] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose weight it shares
    # layer -> how its weight was rounded past round-to-nearest, with the calibration error it left
    rounding: dict[str, str] = field(default_factory=dict)
    # layer -> the SmoothQuant scale it took: through which normalization layer, with which spread
    smoothed: dict[str, str] = field(default_factory=dict)
    # every weight tensor (2-D or more) left in float, with why; and their share of all such weights
    left_float: dict[str, str] = field(default_factory=dict)
    float_share: float = 0.0


def quantize_(
    model: nn.Module,
    plans: Recipe | Mapping[str, LayerPlan],
    activation_mode: str = "static",
) -> QuantReport:
    """Replace the layers that ``plans`` give ``w_bits < 16`` or ``a_bits == 8`` by Quant modules.

    ``plans`` is a Recipe or a mapping of layer keys to plans; keys resolve as Recipe.plan_for does,
    and ``re:`` keys apply to the quantizable layers they match. Everything is checked
    before the model is touched: an exact name the model lacks or that is not quantizable, bits out
    of range, a group size that does not divide the fan-in, tied weights with different plans; and
    a conversion that raises all the same puts the model back as it was.
    Returns a :class:`QuantReport`; nothing is skipped without a reason recorded there.
    """
    modules = dict(model.named_modules())
    recipe = plans if isinstance(plans, Recipe) else Recipe(layers=dict(plans))
    exact = {key for key in recipe.layers if not key.startswith("re:")}
    resolved = {name: recipe.plan_for(name) for name in exact}
    stacks = {name: stacked_params(module) for name, module in modules.items() if name}
    stacks = {name: params for name, params in stacks.items() if params}
    resolved.update(
        (name, recipe.plan_for(name))
        for name, module in modules.items()
        if name and name not in exact and (is_quantizable(module) or name in stacks)
    )
    report = QuantReport()
    todo: dict[str, QuantSpec] = {}
    todo_stacked: dict[str, QuantSpec] = {}
    for name, plan in resolved.items():
        spec = spec_from_plan(plan, activation_mode)
        if not (spec.quantizes_weight or spec.quantizes_input):
            continue
        module = modules.get(name)
        if module is None:
            raise KernelError(
                f"layer {name!r}: expected a module name of the model, but there is none. Names "
                f"look like {', '.join(repr(n) for n in list(modules)[1:4])}."
            )
        if name in stacks:
            spec = _check_stacked(name, module, stacks[name], spec, report)
            if spec is not None:
                todo_stacked[name] = spec
            continue
        if not is_quantizable(module):
            own = recipe.layers.get(name)
            if own is not None and (own.w_bits not in (None, FLOAT_BITS) or own.a_bits == 8):
                raise KernelError(
                    f"layer {name!r}: expected a quantizable layer (Linear, Conv1d, Conv2d, Conv1D, "
                    f"Embedding, stacked experts), but it is a {type(module).__name__}. Name a layer "
                    "inside it, or "
                    "use a 're:' pattern."
                )
            continue
        try:
            spec = _check_spec(name, module, spec, report)
        except KernelError as error:
            if name in exact:
                raise
            report.skipped[name] = str(error)  # a pattern matched a layer it cannot apply to
            continue
        todo[name] = spec
    shared = _tied_groups(model, todo)
    for names in shared.values():
        specs = {_weight_part(todo[n]) for n in names}  # inputs are each layer's own
        if len(specs) > 1:
            raise KernelError(
                f"layers {sorted(names)} share one weight (tied), so they need one plan, but got "
                f"{len(specs)} different ones. Give them the same w_bits and granularity."
            )
    with transaction(model):
        _convert_all(model, modules, todo, report)
        for name, spec in todo_stacked.items():
            replace_by_name(model, name, convert_stacked(modules[name], spec, stacks[name]))
            report.quantized[name] = spec
    for names in shared.values():
        first = sorted(names)[0]
        for other in sorted(names)[1:]:
            report.tied[other] = first
    report.left_float, report.float_share = left_in_float(model)
    return report


KEPT_BY_RECIPE = "kept in float by the recipe"
NOT_CALLED = (
    "the model reads its weight directly instead of calling it, so fake quantization cannot reach "
    "it: kept in float"
)


def unquantize_uncalled_(model: nn.Module, run) -> dict[str, str]:
    """Put back the float layer for every Quant module that ``run(model)`` never calls (Whisper's
    encoder reads its position table as ``.weight``): quantizing it would change the deploy form
    but not the model that was trained and measured. Returns those layers with the reason."""
    called: set[int] = set()
    layers = quant_modules(model)
    handles = [
        m.register_forward_pre_hook(lambda module, args: called.add(id(module)))
        for m in layers.values()
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), float_forward():  # before calibration: nothing to quantize with yet
            run(model)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    used_quantizers = {id(m.weight_quant) for m in layers.values() if id(m) in called}
    reverted = {}
    for name, module in layers.items():
        if id(module) in called or id(module.weight_quant) in used_quantizers:
            continue  # a tied layer that runs quantizes the shared weight for both
        replace_by_name(model, name, float_layer(module))
        reverted[name] = NOT_CALLED
    return reverted


def left_in_float(
    model: nn.Module, reasons: Mapping[str, str] | None = None
) -> tuple[dict[str, str], float]:
    """Every parameter with two or more dimensions whose weight no Quant module compresses, with
    the reason (``reasons`` gives it for layers that know better), and the share of such
    parameters' elements they hold."""
    reasons = reasons or {}
    left: dict[str, str] = {}
    seen: set[int] = set()
    total = floats = 0
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or param.dim() < 2:
                continue
            seen.add(id(param))
            total += param.numel()
            if isinstance(module, StackedQuantMixin) and name in module.stacked:
                continue
            if isinstance(module, QUANT_TYPES) and name == "weight":
                if module.spec.quantizes_weight:
                    continue
                reason = "int8 inputs with a float weight, as the recipe asks"
            elif is_quantizable(module) and name == "weight":
                reason = reasons.get(module_name, KEPT_BY_RECIPE)
            elif isinstance(module, parametrize.ParametrizationList):
                reason = "a parametrized weight (weight norm, say): no quantized form"
            elif isinstance(module, nn.modules.conv._ConvNd):
                reason = (
                    f"{type(module).__name__} has no quantized form (compsearch quantizes Linear, "
                    "Conv1d, Conv2d, Embedding and GPT-2's Conv1D)"
                )
            else:
                reason = (
                    f"a {param.dim()}-D parameter of {type(module).__name__}: no quantized form"
                )
            left[f"{module_name}.{name}" if module_name else name] = reason
            floats += param.numel()
    return left, floats / total if total else 0.0


def _convert_all(model, modules, todo: Mapping[str, QuantSpec], report: QuantReport) -> None:
    quantizers: dict[int, WeightQuantizer] = {}
    for name, spec in todo.items():
        module = modules[name]
        if isinstance(module, QUANT_TYPES):
            report.quantized[name] = module.spec
            continue
        key = id(module.weight)
        new = _convert(module, spec, quantizers.get(key))
        quantizers.setdefault(key, new.weight_quant)
        replace_by_name(model, name, new)
        report.quantized[name] = spec


def _check_stacked(name, module, params, spec: QuantSpec, report: QuantReport) -> QuantSpec | None:
    """The spec for a module's stacked expert matrices (weights only: their inputs are tokens
    routed per expert, with no place for one activation scale), or None if it asks nothing."""
    if spec.quantizes_input:
        report.skipped[f"{name}:input"] = (
            "stacked expert matrices quantize their weights only; a_bits does not apply"
        )
        spec = dataclasses.replace(spec, a_bits=FLOAT_BITS)
    if not spec.quantizes_weight:
        return None
    _check_bits(spec.w_bits)
    fan_in = module._parameters[params[0]].shape[-1]
    if spec.granularity == "per_group" and (
        spec.group_size not in GROUP_SIZES or any(
            module._parameters[p].shape[-1] % spec.group_size for p in params)
    ):  # fmt: skip
        raise KernelError(
            f"layer {name!r}: expected a group_size in {GROUP_SIZES} that divides the experts' "
            f"input features ({fan_in}), but got {spec.group_size!r}. Use per_channel or another."
        )
    refused = get_format(spec.w_format).check(spec)
    if refused:
        raise KernelError(f"layer {name!r}: {refused}.")
    return spec


def _weight_part(spec: QuantSpec) -> QuantSpec:
    return dataclasses.replace(spec, a_bits=FLOAT_BITS, activation_mode="static")


def _check_spec(name: str, module: nn.Module, spec: QuantSpec, report: QuantReport) -> QuantSpec:
    if spec.quantizes_weight:
        _check_bits(spec.w_bits)
    rows = rows_view(module.weight, isinstance(module, conv1d_class() or ()))
    if spec.granularity == "per_group":
        if spec.group_size not in GROUP_SIZES:
            raise KernelError(
                f"layer {name!r}: expected group_size in {GROUP_SIZES}, but got {spec.group_size!r}."
            )
        if rows.shape[1] % spec.group_size:
            raise KernelError(
                f"layer {name!r}: expected group_size to divide the {rows.shape[1]} input features, "
                f"but got group_size={spec.group_size}. Use per_channel or a group size that "
                "divides it."
            )
    if spec.quantizes_weight:
        refused = get_format(spec.w_format).check(spec)
        if refused:
            raise KernelError(f"layer {name!r}: {refused}.")
    if isinstance(module, nn.Embedding) and spec.quantizes_input:
        report.skipped[f"{name}:input"] = "an embedding's input is token ids; a_bits does not apply"
        spec = dataclasses.replace(spec, a_bits=FLOAT_BITS)
    return spec


def _tied_groups(model: nn.Module, todo: Mapping[str, QuantSpec]) -> dict[int, set[str]]:
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_quantizable(module):
            owners.setdefault(id(weight), set()).add(name)
    groups = {}
    for key, names in owners.items():
        if len(names) > 1 and names & set(todo):
            missing = names - set(todo)
            if missing:
                raise KernelError(
                    f"layers {sorted(names)} share one weight (tied), but the plan quantizes only "
                    f"{sorted(names & set(todo))}. Quantize all of them, or none."
                )
            groups[key] = names
    return groups


def _convert(module: nn.Module, spec: QuantSpec, shared: WeightQuantizer | None) -> nn.Module:
    new = as_class(module, quant_class(module))
    new._setup(spec, shared)
    return new


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def stacked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedQuantMixin)}


def quantized_weights(model: nn.Module) -> set[str]:
    """The parameter names whose values the model fake-quantizes."""
    names = {f"{n}.weight" for n, m in quant_modules(model).items() if m.spec.quantizes_weight}
    for name, module in stacked_modules(model).items():
        names.update(f"{name}.{param}" for param in module.stacked)
    return names


def quant_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (w_bits, a_bits)}`` of every Quant module (what BitOps weighs MACs by)."""
    return {name: (m.spec.w_bits, m.spec.a_bits) for name, m in quant_modules(model).items()}


def learn_scales_(model: nn.Module) -> None:
    """Make every weight scale and static activation scale a trained parameter (LSQ)."""
    for module in quant_modules(model).values():
        if module.spec.quantizes_weight:
            module.weight_quant.learn_scales(module.weight)
        if module.input_quant is not None:
            module.input_quant.learn_scales()
