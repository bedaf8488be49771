"""``fp8``: float8 e4m3 weights with a float16 scale per output channel; ``w_bits`` 8 only.

Runs on ``torch._scaled_mm`` on CUDA devices of compute capability 8.9 and above (with float8
activations); anywhere else it is stored as float8 bytes and dequantized (size only).
"""

from __future__ import annotations

import torch

from compsearch.kernels._quant_grid import FP8_MAX, QuantSpec, fake_quantize_fp8
from compsearch.kernels.devices import LINEAR, fp8_available
from compsearch.kernels.formats.base import WeightFormat


class Fp8Format(WeightFormat):
    name = "fp8"
    stored_suffix = "fp8"
    offered = ("per_channel",)
    weight_only = False  # offered in a space only where the fp8 kernel runs it

    def check(self, spec: QuantSpec) -> str | None:
        if spec.w_bits != 8:
            return f"expected w_bits 8 with fp8, but got {spec.w_bits}"
        return None

    def max_level(self, spec: QuantSpec) -> float:
        return FP8_MAX

    def fake_quantize(self, blocks, scale, spec):
        return fake_quantize_fp8(blocks, scale)

    def pack(self, rows, scale, spec):
        stored = scale.to(torch.float16).to(torch.float32)
        blocks = rows.reshape(*scale.shape[:2], -1) / stored
        return blocks.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(rows.shape)

    def unpack(self, stored, scale, spec, rows_shape):
        scale3 = scale.to(torch.float32).unsqueeze(-1)
        return (stored.to(torch.float32).reshape(*scale3.shape[:2], -1) * scale3).reshape(
            rows_shape
        )

    def kernel(self, layer, spec, device_type):
        usable = layer == LINEAR and spec.granularity == "per_channel" and spec.quantizes_input
        return "fp8_scaled_mm" if usable and fp8_available(device_type) else "dequant"
