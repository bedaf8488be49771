"""GPTQ: weights rounded column by column, each rounding error compensated on the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction error on calibration inputs
(Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers").

For a layer ``y = W x`` and calibration inputs ``X``, ``H = 2 X Xᵀ / n`` is the Hessian of
``‖W X − Ŵ X‖²`` in each row of ``Ŵ``. Rounding column ``i`` leaves the error ``e = (w_i − q_i) /
[H⁻¹]_ii``; subtracting ``e · [H⁻¹]_{i, i+1:}`` from the later columns is the optimal update of the
rest of the row (Optimal Brain Surgeon). Columns go in blocks of 128 with lazy updates; group scales
are taken from the already-updated weights when a group starts, as the reference implementation
does.

Here the result must be exactly what the project's fake quantization, packing and deploy forms
compute: the rounded weight is written back on the format's grid, and its scales are frozen on the
layer's quantizer (``WeightQuantizer.scale``), so re-quantizing it returns it unchanged and the
artifact stores exactly these codes.

Layers are done in order, one block (``…layers.3``, or a lone layer) at a time: each block's inputs
are collected with the blocks before it already rounded, so errors do not pile up unseen. A forward
pass stops as soon as the block's last layer has its input. Linear layers (and GPT-2's Conv1D) only:
a convolution or an embedding keeps round-to-nearest, and the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels._quant_grid import rows_view
from compsearch.kernels.formats import get_format, weight_scale
from compsearch.kernels.quant import QuantEmbedding, quant_modules

Run = Callable[[nn.Module, Any], Any]


@dataclass
class GPTQReport:
    """Per layer: the output error on the calibration inputs, relative, before (round-to-nearest)
    and after GPTQ; and the layers that kept round-to-nearest, with why."""

    rtn_error: dict[str, float] = field(default_factory=dict)
    gptq_error: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    blockwise: bool = False  # blocks run alone on stored inputs (else the model from its input)

    def notes(self) -> dict[str, str]:
        """Per rounded layer, what GPTQ did, as a quantization report states it."""
        return {name: f"gptq: output error {error:.2e} on {self.tokens} calibration rows "
                      f"(round-to-nearest {self.rtn_error[name]:.2e})"
                for name, error in self.gptq_error.items()}  # fmt: skip


class _Stop(Exception):
    """Raised by the last hook of a block: the rest of the forward pass is not needed."""


def hessian_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖² / ‖W X‖² from ``H ∝ X Xᵀ``: the relative output error on the inputs."""
    delta = (weight - rounded).double()
    full = weight.double()
    h = hessian.double()
    num = torch.einsum("ij,jk,ik->", delta, h, delta)
    den = torch.einsum("ij,jk,ik->", full, h, full).clamp(min=1e-30)
    return float(num / den)


def gptq_rows(
    rows: torch.Tensor,
    hessian: torch.Tensor,
    spec,
    clip: torch.Tensor | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``rows`` (out × fan-in, float) under ``hessian`` (fan-in × fan-in). Returns the
    rounded rows (on the format's grid) and their scales ``(out, groups, 1)``.

    ``act_order``: columns are rounded in order of decreasing Hessian diagonal (the inputs with
    the most energy first, while the most columns are left to absorb their error), with every
    scale taken from the original weights first ("static groups"), so groups stay contiguous in
    storage."""
    fmt = get_format(spec.w_format)
    w = rows.detach().float().clone()
    h = hessian.detach().float().clone()
    out_features, columns = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    per_group = spec.granularity == "per_group"
    size = spec.group_size if per_group else columns
    if act_order:
        scales = weight_scale(w, spec, clip)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        origin = perm.tolist()
    else:
        scales = torch.empty(out_features, columns // size, fmt.scale_width, device=w.device)
        if not per_group:
            scales[:, 0] = weight_scale(w, spec, clip)[:, 0]
        origin = list(range(columns))
    h += torch.eye(columns, device=h.device) * (damp * torch.diag(h).mean())
    try:
        inverse = torch.linalg.cholesky(
            torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True
        )
    except RuntimeError as error:  # not positive definite even after damping
        raise KernelError(f"GPTQ: the layer's Hessian could not be inverted ({error}).") from None
    rounded = torch.zeros_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1 = w[:, start:end].clone()
        errors = torch.zeros_like(w1)
        inv1 = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if per_group and not act_order and column % size == 0:
                g = column // size  # the group's scale from the weights as updated so far
                span = torch.cat([w1[:, i:], w[:, end:]], 1)[:, :size]
                part = None if clip is None else clip[:, g : g + 1]
                scales[:, g] = weight_scale(span, _per_channel(spec), part)[:, 0]
            scale = scales[:, origin[column] // size]
            q = fmt.fake_quantize(w1[:, i : i + 1].unsqueeze(1), scale.unsqueeze(1), spec)
            q = q.reshape(-1)
            rounded[:, column] = q
            error = (w1[:, i] - q) / inv1[i, i]
            w1[:, i:] -= error.unsqueeze(1) * inv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    if act_order:
        rounded = rounded[:, torch.argsort(perm)]
    return rounded, scales


def _per_channel(spec):
    return dataclasses.replace(spec, granularity="per_channel", group_size=None)


def block_of(name: str) -> str:
    """The block a layer belongs to: its nearest ancestor named by an index (``model.layers.3``),
    or the layer itself."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if re.fullmatch(r"\d+", parts[end - 1]):
            return ".".join(parts[:end])
    return name


@torch.no_grad()
def gptq_(
    model: nn.Module,
    layers: Iterable[str],
    batches: list[Any],
    run: Run,
    damp: float = 0.01,
    act_order: bool = True,
) -> GPTQReport:
    """Round the weights of the quantized ``layers`` of ``model`` with GPTQ, block by block, on
    ``batches`` (``run(model, batch)`` runs one). Layers that cannot take it keep round-to-nearest
    and are listed in the report's ``skipped``."""
    report = GPTQReport()
    modules = quant_modules(model)
    wanted = []
    for name in layers:
        module = modules.get(name)
        if module is None or not module.spec.quantizes_weight:
            continue
        if isinstance(module, (nn.Conv2d, QuantEmbedding)):
            report.skipped[name] = (
                f"GPTQ takes Linear layers; a {type(module).__name__} keeps round-to-nearest"
            )
        elif _shares_weight(module, modules, name):
            report.skipped[name] = "GPTQ of a tied weight is not done; it keeps round-to-nearest"
        else:
            wanted.append(name)
    if not wanted:
        return report
    chosen = set(wanted)
    blocks: dict[str, list[str]] = {}  # in the model's order; _block_chain checks the call order
    for name in (n for n in modules if n in chosen):
        blocks.setdefault(block_of(name), []).append(name)
    was_training = model.training
    model.eval()
    try:
        chain = _block_chain(model, list(blocks), batches, run)
        report.blockwise = chain is not None
        for index, (block, names) in enumerate(blocks.items()):
            layers = {n: modules[n] for n in names}
            if chain is None:
                hessians, tokens = _collect(model, layers, batches, run)
                report.tokens = tokens
                for name in names:
                    _round_layer(name, modules[name], hessians[name], damp, act_order, report)
            else:
                module = model.get_submodule(block)
                gptq_block_(module, layers, chain, report, damp, act_order)
                if index + 1 < len(blocks):
                    chain = block_outputs(module, chain)
    finally:
        model.train(was_training)
    return report


@torch.no_grad()
def gptq_block_(block: nn.Module, layers: dict[str, nn.Module], chain: list[tuple[tuple, dict]],
                report: GPTQReport, damp: float = 0.01, act_order: bool = True) -> None:  # fmt: skip
    """GPTQ of ``layers`` (Quant modules of ``block``, by the names the report gives them), their
    inputs collected by running ``block`` alone on ``chain`` (its stored ``(args, kwargs)`` per
    calibration batch) before any of them is rounded."""
    hessians, report.tokens = _collect_in_block(block, layers, chain)
    for name, module in layers.items():
        _round_layer(name, module, hessians[name], damp, act_order, report)


@torch.no_grad()
def block_outputs(block: nn.Module, chain: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The next block's inputs: ``block``'s output on each stored input, the other arguments kept."""
    return [(_with_first(args, _main(block(*args, **kwargs))), kwargs) for args, kwargs in chain]


# -- block by block -----------------------------------------------------------------------------------

_NO_CACHE = {"past_key_values": None, "past_key_value": None, "use_cache": False}


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(args: tuple, first: torch.Tensor) -> tuple:
    return (first, *args[1:])


def _block_chain(
    model: nn.Module, blocks: list[str], batches: list[Any], run: Run
) -> list[tuple[tuple, dict]] | None:
    """The first block's inputs for every batch, where the blocks form a plain chain — each
    called once, in order, on the previous block's output, with the same other arguments — so the
    rest can be run block by block from them; ``None`` otherwise (then every block is collected by
    running the model from its input, which is always right and slower)."""
    if not all(re.fullmatch(r"\d+", b.rsplit(".", 1)[-1]) for b in blocks):
        return None  # a lone layer outside the numbered blocks
    modules = [model.get_submodule(b) for b in blocks]
    calls: list[tuple[int, tuple, dict]] = []
    outputs: list[Any] = []
    handles = []
    for index, module in enumerate(modules):
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, index=index: calls.append((index, args, kwargs)),
            with_kwargs=True))  # fmt: skip
        handles.append(module.register_forward_hook(lambda m, a, out: outputs.append(out)))
    try:
        run(model, batches[0])
    finally:
        for handle in handles:
            handle.remove()
    if [c[0] for c in calls] != list(range(len(modules))) or not calls[0][1]:
        return None
    for (_, args, kwargs), (_, next_args, next_kwargs), out in zip(
        calls, calls[1:], outputs, strict=False
    ):
        if not next_args or not torch.equal(_main(out), next_args[0]):
            return None
        if len(args) != len(next_args) or not _same(kwargs, next_kwargs):
            return None
    first = [(calls[0][1], {**calls[0][2], **_pick(calls[0][2])})]
    return first + block_inputs(model, modules[0], batches[1:], run)


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, batches: list[Any], run: Run
                 ) -> list[tuple[tuple, dict]]:  # fmt: skip
    """``block``'s ``(args, kwargs)`` on each batch, each forward pass stopped as it reaches the
    block (nothing from the block on runs, so its weights need not exist yet); arguments that would
    write to a key/value cache are replaced by ``None``."""
    seen: list[tuple[tuple, dict]] = []
    for batch in batches:
        caught: list[tuple[tuple, dict]] = []

        def catch(m, args, kwargs, caught=caught):
            caught.append((args, {**kwargs, **_pick(kwargs)}))
            raise _Stop

        handle = block.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with contextlib.suppress(_Stop):
                run(model, batch)
        finally:
            handle.remove()
        if not caught:
            raise KernelError("the calibration batches never reached the first block.")
        seen.append(caught[0])
    return seen


def _pick(kwargs: dict) -> dict:
    """Overrides that keep a replayed block from writing to the model's key/value cache (a
    cache object under any argument name), which would make a second call attend to the first."""
    overrides = {k: v for k, v in _NO_CACHE.items() if k in kwargs}
    overrides.update((k, None) for k, v in kwargs.items() if _is_cache(v))
    return overrides


def _is_cache(value: Any) -> bool:
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or not torch.equal(value, other):
                return False
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            if len(value) != len(other) or not all(map(torch.equal, value, other)):
                return False
        elif key in _NO_CACHE or _is_cache(value):
            continue
        elif value is not other and value != other:
            return False
    return True


def _collect_in_block(
    block: nn.Module, modules: dict[str, nn.Module], chain: list[tuple[tuple, dict]]
) -> tuple[dict[str, torch.Tensor], int]:
    """``2 X Xᵀ / n`` of each layer's input, running only ``block`` on its stored inputs."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    handles = [module.register_forward_pre_hook(
        lambda m, args, name=name: _accumulate(m, args[0], name, sums, counts))
        for name, module in modules.items()]  # fmt: skip
    try:
        for args, kwargs in chain:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return _hessians(modules, sums, counts)


def _accumulate(module, x, name, sums, counts) -> None:
    x = module.quantized_input(x).detach()
    flat = x.reshape(-1, x.shape[-1]).float()
    product = flat.t() @ flat
    sums[name] = product if name not in sums else sums[name] + product
    counts[name] += flat.shape[0]


def _hessians(modules, sums, counts) -> tuple[dict[str, torch.Tensor], int]:
    missing = [n for n in modules if n not in sums]
    if missing:
        raise KernelError(f"GPTQ: layers {missing} never ran on the calibration batches.")
    return {n: 2 * sums[n] / counts[n] for n in modules}, max(counts.values())


def _shares_weight(module: nn.Module, modules: dict[str, nn.Module], name: str) -> bool:
    return any(other is not module and other.weight is module.weight for other in modules.values())


def _collect(
    model: nn.Module, modules: dict[str, nn.Module], batches: list[Any], run: Run
) -> tuple[dict[str, torch.Tensor], int]:
    """``X Xᵀ / n`` of each layer's (quantized) input over ``batches``; each pass stops once every
    layer of the block has seen its input."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    pending: set[str] = set()

    def hook(module, args, name):
        _accumulate(module, args[0], name, sums, counts)
        pending.discard(name)
        if not pending:
            raise _Stop

    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: hook(m, args, name))
        for name, module in modules.items()
    ]
    try:
        for batch in batches:
            pending.update(modules)
            with contextlib.suppress(_Stop):
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return _hessians(modules, sums, counts)


def _round_layer(name: str, module: nn.Module, hessian: torch.Tensor, damp: float,
                 act_order: bool, report) -> None:  # fmt: skip
    quantizer = module.weight_quant
    rows = rows_view(module.weight.data, quantizer.transposed)
    spec = module.spec
    rtn = quantizer(module.weight.detach())
    report.rtn_error[name] = hessian_error(rows, rows_view(rtn, quantizer.transposed), hessian)
    clip = quantizer.clip if get_format(spec.w_format).clip_search else None
    rounded, scales = gptq_rows(rows, hessian, spec, clip, damp, act_order=act_order)
    report.gptq_error[name] = hessian_error(rows, rounded, hessian)
    rows.copy_(rounded.to(rows.dtype))
    quantizer.scale = nn.Parameter(scales.to(rows.device), requires_grad=False)
