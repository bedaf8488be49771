"""Weight grids, the fake-quant function (exact forward, straight-through backward, LSQ scale
gradient) and weight codes — shared by fake quantization, packing and the deploy forms.

See :mod:`compsearch.kernels.quant` for the grids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from compsearch.errors import KernelError
from compsearch.recipes.schema import FLOAT_BITS, LayerPlan

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


def is_midrise(bits: int, zero_level: bool = False) -> bool:
    return bits < 8 and not zero_level


def grid(bits: int, zero_level: bool = False) -> tuple[int, int, float, float]:
    """``(qmin, qmax, offset, half_levels)`` of the ``bits``-wide weight grid (module docstring):
    mid-rise below 8 bits unless ``zero_level`` (the integer grid of ``intz``)."""
    _check_bits(bits)
    half = 2 ** (bits - 1)
    if is_midrise(bits, zero_level):
        return -half, half - 1, 0.5, float(half)
    return -half, half - 1, 0.0, half - 0.5


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
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    grad_scale: float = 1.0,
    zero_level: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the ``bits``-wide weight grid with (broadcastable) ``scale``."""
    qmin, qmax, offset, _ = grid(bits, zero_level)
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


def weight_codes(
    rows: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, zero_level: bool = False
) -> torch.Tensor:
    """Integer codes ``q`` (int32, shape of ``rows``) as the fake-quant forward rounds them."""
    qmin, qmax, offset, _ = grid(spec.w_bits, zero_level)
    stored = scale.to(torch.float16).to(rows.dtype)
    q = torch.round(grouped(rows, spec) / stored - offset).clamp(qmin, qmax)
    return q.reshape(rows.shape).to(torch.int32)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, zero_level: bool = False
) -> torch.Tensor:
    """Float weight rows from codes ``q`` and scales ``(rows, groups, 1)``: bit-equal to fake quant."""
    _, _, offset, _ = grid(spec.w_bits, zero_level)
    stored = scale.to(torch.float16).to(torch.float32)
    values = (grouped(q.to(torch.float32), spec) + offset) * stored
    return values.reshape(q.shape)
