"""``int`` and ``intz``: symmetric integer grids of 2–8 bits, one float16 scale per output channel
or group (``int`` mid-rise below 8 bits, ``intz`` with zero a level at every width).

See :mod:`compsearch.kernels.quant` for the grids (mid-rise below 8 bits, integer at 8); codes are
stored unsigned and packed densely (:mod:`compsearch.kernels._bits`). Deploy kernels: oneDNN's
static int8 linear on x86 CPUs, ``torch._int_mm`` elsewhere (dynamic per-token activations), an
int8 gather for embeddings; per-group weights and convolutions are stored packed and dequantized.
"""

from __future__ import annotations

import math

import torch

from compsearch.kernels._bits import pack_codes, unpack_codes
from compsearch.kernels._quant_grid import (
    QuantSpec,
    dequantize_codes,
    fake_quantize,
    grid,
    weight_codes,
)
from compsearch.kernels.devices import EMBEDDING, LINEAR, int_mm_available, onednn_available
from compsearch.kernels.formats.base import WeightFormat


class IntFormat(WeightFormat):
    name = "int"
    stored_suffix = "codes"
    clip_search = True
    #: the integer grid (zero a level) at every width; ``int`` is mid-rise below 8 bits
    zero_level = False

    def grid(self, spec: QuantSpec) -> tuple[int, int, float, float]:
        """``(qmin, qmax, offset, half_levels)``: a weight is ``scale * (q + offset)``."""
        return grid(spec.w_bits, self.zero_level)

    def max_level(self, spec: QuantSpec) -> float:
        return self.grid(spec)[3]

    def fake_quantize(self, blocks, scale, spec):
        grad_scale = 1.0 / math.sqrt(blocks.shape[-1] * max(self.grid(spec)[1], 1))
        return fake_quantize(blocks, scale, spec.w_bits, grad_scale, self.zero_level)

    def pack(self, rows, scale, spec):
        q = weight_codes(rows, scale, spec, self.zero_level)
        return pack_codes(q - self.grid(spec)[0], spec.w_bits)

    def unpack(self, stored, scale, spec, rows_shape):
        q = self.signed_codes(stored, spec, rows_shape)
        return dequantize_codes(q, scale.float().unsqueeze(-1), spec, self.zero_level)

    def signed_codes(
        self, stored: torch.Tensor, spec: QuantSpec, rows_shape: tuple[int, int]
    ) -> torch.Tensor:
        """Codes ``q`` as int32 ``rows_shape`` from the packed unsigned codes."""
        rows, fan_in = rows_shape
        unsigned = unpack_codes(stored, spec.w_bits, rows * fan_in)
        return (unsigned.to(torch.int32) + self.grid(spec)[0]).reshape(rows, fan_in)

    def kernel(self, layer, spec, device_type):
        if layer == EMBEDDING:
            return "int8_gather"
        if layer != LINEAR or spec.granularity != "per_channel" or not spec.quantizes_input:
            return "dequant"
        if device_type == "cpu" and spec.activation_mode == "static" and onednn_available():
            return "onednn_qlinear"
        return "int_mm" if int_mm_available(device_type) else "dequant"

    def label(self, spec: QuantSpec) -> str:
        group = f"g{spec.group_size}" if spec.granularity == "per_group" else ""
        act = "a8" if spec.a_bits == 8 else ""
        return f"w{spec.w_bits}{group}{act}"


class IntZeroFormat(IntFormat):
    """``intz``: the integer grid with zero a level at every width (``q`` in
    ``[-2**(n-1), 2**(n-1) - 1]``, weight ``scale * q``): what GGUF's Q4_0/Q8_0 and
    compressed-tensors' symmetric int store, so a recipe in it exports exactly. Same kernels as
    ``int``; at 8 bits the two are the same grid."""

    name = "intz"
    zero_level = True

    def label(self, spec: QuantSpec) -> str:
        return super().label(spec) + "z"
