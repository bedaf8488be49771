"""``int``: symmetric integer grids of 2–8 bits, one float16 scale per output channel or group.

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

    def max_level(self, spec: QuantSpec) -> float:
        return grid(spec.w_bits)[3]

    def fake_quantize(self, blocks, scale, spec):
        grad_scale = 1.0 / math.sqrt(blocks.shape[-1] * grid(spec.w_bits)[1])
        return fake_quantize(blocks, scale, spec.w_bits, grad_scale)

    def pack(self, rows, scale, spec):
        q = weight_codes(rows, scale, spec)
        return pack_codes(q - grid(spec.w_bits)[0], spec.w_bits)

    def unpack(self, stored, scale, spec, rows_shape):
        return dequantize_codes(signed_codes(stored, spec, rows_shape), scale.float().unsqueeze(-1),
                                spec)  # fmt: skip

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


def signed_codes(
    stored: torch.Tensor, spec: QuantSpec, rows_shape: tuple[int, int]
) -> torch.Tensor:
    """Codes ``q`` as int32 ``rows_shape`` from the packed unsigned codes."""
    rows, fan_in = rows_shape
    unsigned = unpack_codes(stored, spec.w_bits, rows * fan_in)
    return (unsigned.to(torch.int32) + grid(spec.w_bits)[0]).reshape(rows, fan_in)
