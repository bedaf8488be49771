"""``affine``: asymmetric integer grids of 2–8 bits — a float16 scale ``s`` and a float16 minimum
``m`` per output channel or group, weight ``s * q + m`` for ``q`` in ``[0, 2**n - 1]``.

The grid spans each group's own ``[min, max]`` (times the MSE observer's clip factor), so a
one-sided or off-centre group loses no level to the side it does not use — what GPTQ's and AWQ's
reference implementations do with a zero point, here with the minimum stored as a float16 value
as GGUF's Q4_1/Q5_1 store it (so a 4-bit group-32 recipe exports to Q4_1 exactly). The scale
tensor holds both numbers: ``(rows, groups, 2)`` = ``[s, m]`` (stored interleaved, float16, as
``(rows, 2 x groups)``). Stored packed, computed in float (``dequant``): no integer kernel runs it.
"""

from __future__ import annotations

import torch

from compsearch.kernels._bits import pack_codes, unpack_codes
from compsearch.kernels._quant_grid import SCALE_MIN, QuantSpec, _check_bits, _sum_to
from compsearch.kernels.formats.base import WeightFormat


def _stored(params: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, m)`` as the artifact stores them (float16), each ``(..., 1)``."""
    stored = params.to(torch.float16).to(dtype)
    return stored[..., 0:1], stored[..., 1:2]


class _FakeAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params, qmax):
        s, m = _stored(params, x.dtype)
        v = (x - m) / s
        rounded = torch.round(v)
        q = rounded.clamp(0, qmax)
        inside = (rounded >= 0) & (rounded <= qmax)
        ctx.save_for_backward(v, q, inside)
        ctx.shape = params.shape
        return q * s + m

    @staticmethod
    def backward(ctx, grad):
        v, q, inside = ctx.saved_tensors
        grad_params = None
        if ctx.needs_input_grad[1]:  # LSQ-style: d/ds (q s + m), d/dm; straight through inside
            shape = (*ctx.shape[:-1], 1)
            grad_s = _sum_to(grad * torch.where(inside, q - v, q), torch.Size(shape))
            grad_m = _sum_to(grad * (~inside), torch.Size(shape))
            grad_params = torch.cat([grad_s, grad_m], -1)
        return grad * inside, grad_params, None


class AffineFormat(WeightFormat):
    name = "affine"
    stored_suffix = "codes"
    clip_search = True
    scale_width = 2

    def qmax(self, spec: QuantSpec) -> int:
        _check_bits(spec.w_bits)
        return 2**spec.w_bits - 1

    def max_level(self, spec: QuantSpec) -> float:
        return float(self.qmax(spec))

    def scales(self, blocks, clip, spec):
        lo = blocks.detach().amin(-1, keepdim=True)
        hi = blocks.detach().amax(-1, keepdim=True)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = ((hi - lo) / self.qmax(spec)).clamp(min=SCALE_MIN)
        return torch.cat([scale, lo], -1)

    def valid(self, scale):
        return torch.cat([scale[..., 0:1].abs().clamp(min=SCALE_MIN), scale[..., 1:2]], -1)

    def fake_quantize(self, blocks, scale, spec):
        return _FakeAffine.apply(blocks, scale, self.qmax(spec))

    def codes(self, blocks: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """Unsigned codes ``q`` (int32, shape of ``blocks``) as the fake-quant forward rounds them."""
        s, m = _stored(scale, blocks.dtype)
        return torch.round((blocks - m) / s).clamp(0, self.qmax(spec)).to(torch.int32)

    def pack(self, rows, scale, spec):
        blocks = rows.reshape(*scale.shape[:2], -1)
        return pack_codes(self.codes(blocks, scale, spec), spec.w_bits)

    def unpack(self, stored, scale, spec, rows_shape):
        rows, fan_in = rows_shape
        params = scale.to(torch.float32).reshape(rows, -1, 2)
        q = unpack_codes(stored, spec.w_bits, rows * fan_in).to(torch.float32)
        s, m = _stored(params, torch.float32)
        return (q.reshape(rows, params.shape[1], -1) * s + m).reshape(rows_shape)

    def label(self, spec: QuantSpec) -> str:
        group = f"g{spec.group_size}" if spec.granularity == "per_group" else ""
        return f"w{spec.w_bits}{group}asym"
