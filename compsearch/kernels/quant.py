"""Fake quantization for training (QAT): weight grids, the straight-through estimator, Quant modules
and the one verb that applies a recipe's bit widths, :func:`quantize_`.

Weight grid (symmetric, all ``2**n`` levels, one scale ``s`` per output channel or per group):

* ``n < 8`` — *mid-rise*: values ``s * (q + 1/2)`` for ``q`` in ``[-2**(n-1), 2**(n-1) - 1]`` and
  ``s = amax / 2**(n-1)``: the ``2**n`` cells tile ``[-amax, amax]`` and every value is a cell centre.
  (A zero-centred grid wastes a level at 2 bits: 3 usable levels instead of 4.)
* ``n == 8`` — *integer*: values ``s * q`` for ``q`` in ``[-128, 127]``, ``s = amax / 127.5``; zero
  is exact, as int8 kernels expect.

Either way a weight is ``sigma * c`` with an int8 code ``c`` (``2q + 1`` and ``s/2`` for mid-rise,
``q`` and ``s`` for integer), which is how the deploy form runs every width on int8 kernels.
Scales are rounded to float16 inside the forward, because that is how they are stored: the packed
artifact reproduces the fake-quant weights bit for bit.

Activations: ``a_bits = 8`` quantizes a layer's input to int8 levels ``[-127, 127]``, with one
calibrated scale per tensor (``static``) or one scale per token computed at run time (``dynamic``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compsearch.errors import KernelError
from compsearch.kernels._modules import replace_by_name
from compsearch.recipes.schema import FLOAT_BITS, GROUP_SIZES, LayerPlan, Recipe

FP8_MAX = 448.0  # largest float8 e4m3fn value
SCALE_MIN = 2.0**-24  # smallest positive float16 (subnormal): scales never underflow to zero
ACT_QMAX = 127


# -- formats -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """The resolved quantization of one layer (what a LayerPlan asks for, with defaults filled)."""

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    granularity: str = "per_channel"
    group_size: int | None = None
    w_format: str = "int"
    activation_mode: str = "static"

    @property
    def quantizes_weight(self) -> bool:
        return self.w_bits < FLOAT_BITS

    @property
    def quantizes_input(self) -> bool:
        return self.a_bits < FLOAT_BITS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_from_plan(plan: LayerPlan, activation_mode: str = "static") -> QuantSpec:
    granularity = plan.granularity or "per_channel"
    return QuantSpec(
        w_bits=FLOAT_BITS if plan.w_bits is None else plan.w_bits,
        a_bits=FLOAT_BITS if plan.a_bits is None else plan.a_bits,
        granularity=granularity,
        group_size=plan.group_size if granularity == "per_group" else None,
        w_format=plan.w_format or "int",
        activation_mode=activation_mode,
    )


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise KernelError(
            f"w_bits: expected an integer in [2, 8] (16 keeps the weight in float), but got "
            f"{bits!r}."
        )


def is_midrise(bits: int) -> bool:
    return bits < 8


def grid(bits: int) -> tuple[int, int, float, float]:
    """``(qmin, qmax, offset, half_levels)`` of the ``bits``-wide weight grid (module docstring)."""
    _check_bits(bits)
    if is_midrise(bits):
        half = 2 ** (bits - 1)
        return -half, half - 1, 0.5, float(half)
    return -128, 127, 0.0, 127.5


# -- the fake-quant function (exact forward, straight-through backward, LSQ gradient for the scale) --


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, offset, grad_scale):
        stored = scale.to(torch.float16).to(x.dtype)  # the scale as the artifact stores it
        v = x / stored
        rounded = torch.round(v - offset)
        q = rounded.clamp(qmin, qmax)
        ctx.save_for_backward(v, q, (rounded >= qmin) & (rounded <= qmax))
        ctx.offset, ctx.grad_scale, ctx.scale_shape = offset, grad_scale, scale.shape
        return (q + offset) * stored

    @staticmethod
    def backward(ctx, grad):
        v, q, inside = ctx.saved_tensors
        grad_x = grad * inside
        grad_s = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, q + ctx.offset - v, q + ctx.offset)
            grad_s = _sum_to(grad * local, ctx.scale_shape) * ctx.grad_scale
        return grad_x, grad_s, None, None, None, None


def _sum_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    while tensor.dim() > len(shape):
        tensor = tensor.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and tensor.shape[dim] != 1:
            tensor = tensor.sum(dim, keepdim=True)
    return tensor


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, bits: int, grad_scale: float = 1.0
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the ``bits``-wide weight grid with (broadcastable) ``scale``."""
    qmin, qmax, offset, _ = grid(bits)
    return _FakeQuantize.apply(x, scale, qmin, qmax, offset, grad_scale)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round ``x / scale`` to float8 e4m3 and back, straight-through."""
    stored = scale.to(torch.float16).to(x.dtype)
    value = (x / stored).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * stored
    return value.detach() + (x - x.detach())


# -- weight codes (shared by fake quant, packing and deploy) ----------------------------------------


def rows_view(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """A weight as ``(output rows, fan-in)``: Linear/Embedding as is, Conv flattened, Conv1D transposed."""
    if transposed:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def grouped(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(rows, groups, group_size)``; per-channel is one group spanning the whole fan-in."""
    group = spec.group_size if spec.granularity == "per_group" else rows.shape[1]
    return rows.reshape(rows.shape[0], rows.shape[1] // group, group)


def weight_scale(rows: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None) -> torch.Tensor:
    """Scale per (row, group), shape ``(rows, groups, 1)``, from the (clipped) absolute maximum."""
    amax = grouped(rows, spec).detach().abs().amax(-1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    half = FP8_MAX if spec.w_format == "fp8" else grid(spec.w_bits)[3]
    return (amax / half).clamp(min=SCALE_MIN)


def weight_codes(rows: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``q`` (int32, shape of ``rows``) as the fake-quant forward rounds them."""
    qmin, qmax, offset, _ = grid(spec.w_bits)
    stored = scale.to(torch.float16).to(rows.dtype)
    q = torch.round(grouped(rows, spec) / stored - offset).clamp(qmin, qmax)
    return q.reshape(rows.shape).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float weight rows from codes ``q`` and scales ``(rows, groups, 1)``: bit-equal to fake quant."""
    _, _, offset, _ = grid(spec.w_bits)
    stored = scale.to(torch.float16).to(torch.float32)
    values = (grouped(q.to(torch.float32), spec) + offset) * stored
    return values.reshape(q.shape)


# -- quantizer modules -----------------------------------------------------------------------------


class WeightQuantizer(nn.Module):
    """Fake-quantizes one weight. Scales follow the weight (amax × clip ratio) unless learned (LSQ)."""

    def __init__(self, spec: QuantSpec, rows: int, fan_in: int, transposed: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.transposed = transposed
        groups = fan_in // spec.group_size if spec.granularity == "per_group" else 1
        self.register_buffer("clip", torch.ones(rows, groups, 1))
        self.scale: nn.Parameter | None = None

    def current_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return self.scale.abs().clamp(min=SCALE_MIN)
        return weight_scale(rows_view(weight, self.transposed), self.spec, self.clip)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = rows_view(weight, self.transposed)
        scale = self.current_scale(weight)
        blocks = grouped(rows, self.spec)
        if self.spec.w_format == "fp8":
            out = fake_quantize_fp8(blocks, scale)
        else:
            grad_scale = 1.0 / math.sqrt(blocks.shape[-1] * grid(self.spec.w_bits)[1])
            out = fake_quantize(blocks, scale, self.spec.w_bits, grad_scale)
        out = out.reshape(rows.shape)
        return out.t() if self.transposed else out.reshape(weight.shape)

    def learn_scales(self, weight: torch.Tensor) -> None:
        """Turn the current scales into a trained parameter (LSQ)."""
        if self.scale is None:
            self.scale = nn.Parameter(self.current_scale(weight).detach().clone())

    def reset(self, rows: int, fan_in: int) -> None:
        """Forget clip ratios and learned scales after the weight changed shape (pruning)."""
        groups = fan_in // self.spec.group_size if self.spec.granularity == "per_group" else 1
        self.clip = torch.ones(rows, groups, 1, device=self.clip.device)
        self.scale = None

    def extra_repr(self) -> str:
        s = self.spec
        detail = f", group_size={s.group_size}" if s.granularity == "per_group" else ""
        return f"w_bits={s.w_bits}, format={s.w_format}, {s.granularity}{detail}"


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer's input to int8 levels: static (calibrated scale) or per token."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise KernelError(f"activation_mode: expected 'static' or 'dynamic', but got {mode!r}.")
        self.mode = mode
        self.register_buffer("scale", torch.ones(()))
        self.calibrated = mode == "dynamic"
        self.observer = None  # set by calibration while it runs
        self.learned: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if self.mode == "dynamic":
            scale = x.detach().abs().amax(-1, keepdim=True).clamp(min=SCALE_MIN) / ACT_QMAX
            return _fake_act(x, scale.to(torch.float32), 1.0).to(x.dtype)
        if not self.calibrated:
            raise KernelError(
                "a static activation quantizer expected calibrated ranges, but none were observed. "
                "Run compsearch.kernels.observers.calibrate(model, batches, run) first."
            )
        if self.learned is not None:
            grad_scale = 1.0 / math.sqrt(x[0].numel() * ACT_QMAX)
            return _fake_act(x, self.learned.abs().clamp(min=SCALE_MIN), grad_scale)
        return _fake_act(x, self.scale, 1.0)

    def set_scale(self, scale: float | torch.Tensor) -> None:
        value = torch.as_tensor(scale, dtype=torch.float32, device=self.scale.device)
        self.scale = value.clamp(min=SCALE_MIN).reshape(())
        self.calibrated = True
        if self.learned is not None:
            self.learned.data.copy_(self.scale)

    def learn_scales(self) -> None:
        if self.mode == "static" and self.learned is None:
            self.learned = nn.Parameter(self.scale.detach().clone())

    def current_scale(self) -> torch.Tensor:
        return (self.learned.detach().abs() if self.learned is not None else self.scale).clamp(
            min=SCALE_MIN
        )

    def extra_repr(self) -> str:
        return f"a_bits=8, mode={self.mode}"


def _fake_act(x: torch.Tensor, scale: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Symmetric int8 levels [-127, 127]. The forward value is exactly ``q * scale``; the gradient is
    straight-through inside the range, and LSQ's for a learned ``scale``."""
    v = x / scale
    q = torch.round(v).clamp(-ACT_QMAX, ACT_QMAX)
    inside = (v >= -ACT_QMAX) & (v <= ACT_QMAX)
    out = (q * scale).detach() + (x - x.detach()) * inside
    if scale.requires_grad:
        local = torch.where(inside, q - v, q).detach()
        scaled = scale * grad_scale
        out = out + local * (scaled - scaled.detach())
    return out


# -- the Quant modules -----------------------------------------------------------------------------

_float_forward = False


@contextlib.contextmanager
def float_forward():
    """Within this block Quant modules compute in float with their raw weights (for analyses that
    must see parameters, such as the pruning tracer)."""
    global _float_forward
    previous, _float_forward = _float_forward, True
    try:
        yield
    finally:
        _float_forward = previous


class QuantMixin:
    """Shared by the Quant modules: ``weight_quant`` always, ``input_quant`` when ``a_bits == 8``."""

    spec: QuantSpec
    transposed_weight = False

    def _setup(self, spec: QuantSpec, weight_quant: WeightQuantizer | None = None) -> None:
        self.spec = spec
        rows = rows_view(self.weight, self.transposed_weight)
        self.weight_quant = weight_quant or WeightQuantizer(
            spec, rows.shape[0], rows.shape[1], self.transposed_weight
        )
        self.input_quant = ActQuantizer(spec.activation_mode) if spec.quantizes_input else None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if _float_forward else self.weight_quant(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None or _float_forward else self.input_quant(x)

    def on_resized(self) -> None:
        """Called by pruning after the weight changed shape."""
        rows = rows_view(self.weight, self.transposed_weight)
        self.weight_quant.reset(rows.shape[0], rows.shape[1])


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """Quantizes only the rows it looks up: scales are per row (or per group within a row), so a
    gathered row quantizes exactly as it would inside the whole table — at a fraction of the cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _float_forward:
            return F.embedding(x, self.weight, self.padding_idx)
        ids = x.reshape(-1)
        rows = F.embedding(ids, self.weight, self.padding_idx)
        quantizer = self.weight_quant
        if quantizer.scale is not None:
            scale = quantizer.current_scale(self.weight)[ids]
        else:
            scale = weight_scale(rows, quantizer.spec, quantizer.clip[ids])
        blocks = grouped(rows, quantizer.spec)
        if quantizer.spec.w_format == "fp8":
            out = fake_quantize_fp8(blocks, scale)
        else:
            grad_scale = 1.0 / math.sqrt(blocks.shape[-1] * grid(quantizer.spec.w_bits)[1])
            out = fake_quantize(blocks, scale, quantizer.spec.w_bits, grad_scale)
        return out.reshape(*x.shape, self.embedding_dim)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a core dependency; this only guards odd installs
        return None
    return Conv1D


def _make_quant_conv1d():
    base = _conv1d_class()
    if base is None:
        return None

    class QuantConv1D(QuantMixin, base):
        """GPT-2's Conv1D: a Linear with a transposed ``(in, out)`` weight."""

        transposed_weight = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quantized_input(x)
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.quantized_weight())
            return out.reshape(*x.shape[:-1], self.nf)

    return QuantConv1D


QuantConv1D = _make_quant_conv1d()
QUANT_TYPES: tuple[type, ...] = tuple(
    t for t in (QuantLinear, QuantConv2d, QuantEmbedding, QuantConv1D) if t is not None
)


def quant_class(module: nn.Module) -> type | None:
    """The Quant module type that replaces ``module``, or None if it is not quantizable."""
    if isinstance(module, QUANT_TYPES):
        return None
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return QuantConv1D
    if isinstance(module, nn.Linear):
        return QuantLinear
    if isinstance(module, nn.Conv2d):
        return QuantConv2d
    if isinstance(module, nn.Embedding):
        return QuantEmbedding
    return None


def is_quantizable(module: nn.Module) -> bool:
    return quant_class(module) is not None or isinstance(module, QUANT_TYPES)


# -- quantize_ -------------------------------------------------------------------------------------


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the spec of every quantized layer, and every layer it skipped."""

    quantized: dict[str, QuantSpec] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose weight it shares


def quantize_(
    model: nn.Module,
    plans: Recipe | Mapping[str, LayerPlan],
    activation_mode: str = "static",
) -> QuantReport:
    """Replace the layers that ``plans`` give ``w_bits < 16`` or ``a_bits == 8`` by Quant modules.

    ``plans`` is a Recipe or a mapping of layer keys to plans; keys resolve as Recipe.plan_for does,
    and ``re:`` keys apply to the quantizable layers they match. Everything is checked
    before the model is touched: an exact name the model lacks or that is not quantizable, bits out
    of range, a group size that does not divide the fan-in, tied weights with different plans.
    Returns a :class:`QuantReport`; nothing is skipped without a reason recorded there.
    """
    modules = dict(model.named_modules())
    recipe = plans if isinstance(plans, Recipe) else Recipe(layers=dict(plans))
    exact = {key for key in recipe.layers if not key.startswith("re:")}
    resolved = {name: recipe.plan_for(name) for name in exact}
    resolved.update(
        (name, recipe.plan_for(name))
        for name, module in modules.items()
        if name and name not in exact and is_quantizable(module)
    )
    report = QuantReport()
    todo: dict[str, QuantSpec] = {}
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
        if not is_quantizable(module):
            own = recipe.layers.get(name)
            if own is not None and (own.w_bits not in (None, FLOAT_BITS) or own.a_bits == 8):
                raise KernelError(
                    f"layer {name!r}: expected a quantizable layer (Linear, Conv2d, Conv1D, "
                    f"Embedding), but it is a {type(module).__name__}. Name a layer inside it, or "
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
        specs = {todo[n] for n in names}
        if len(specs) > 1:
            raise KernelError(
                f"layers {sorted(names)} share one weight (tied), so they need one plan, but got "
                f"{len(specs)} different ones. Give them the same w_bits and granularity."
            )
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
    for names in shared.values():
        first = sorted(names)[0]
        for other in sorted(names)[1:]:
            report.tied[other] = first
    return report


def _check_spec(name: str, module: nn.Module, spec: QuantSpec, report: QuantReport) -> QuantSpec:
    if spec.quantizes_weight:
        _check_bits(spec.w_bits)
    rows = rows_view(module.weight, isinstance(module, _conv1d_class() or ()))
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
    if spec.w_format == "fp8" and spec.w_bits != 8:
        raise KernelError(f"layer {name!r}: expected w_bits 8 with fp8, but got {spec.w_bits}.")
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
    cls = quant_class(module)
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._setup(spec, shared)
    return new


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def learn_scales_(model: nn.Module) -> None:
    """Make every weight scale and static activation scale a trained parameter (LSQ)."""
    for module in quant_modules(model).values():
        if module.spec.quantizes_weight:
            module.weight_quant.learn_scales(module.weight)
        if module.input_quant is not None:
            module.input_quant.learn_scales()


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.double() - approximation.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise.clamp(min=1e-300)))
