"""What the device can do: which low-precision kernels run here (checked by running them once)."""

from __future__ import annotations

import functools

import torch

LINEAR, CONV2D, EMBEDDING = "linear", "conv2d", "embedding"
EXPERTS = "experts"  # stacked (experts, out, in) matrices of a mixture-of-experts layer


# -- what the device can do ------------------------------------------------------------------------


@functools.cache
def onednn_available() -> bool:
    """oneDNN's int8 linear runs here (x86 CPU builds of torch) *and is exact*: on x86 CPUs without
    VNNI (AVX2 only), oneDNN's u8×s8 path sums pairs of products in saturating 16-bit registers, so
    large activations times large weights come out wrong (measured on an AVX2 EPYC: 1,048,544 for
    2,072,640). The probe is such a product; where it is wrong, static int8 runs on torch._int_mm."""
    try:
        weight = torch.full((8, 64), 127, dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        x = torch.full((2, 64), 255, dtype=torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64), None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return bool(torch.equal(out, torch.full((2, 8), 255.0 * 127 * 64)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def int_mm_available(device_type: str) -> bool:
    """``torch._int_mm`` runs here, exactly, and faster than float: on a CPU only where int8 dot
    products are native (the oneDNN probe above). Without VNNI its CPU path is a slow loop —
    measured on an AVX2 EPYC, 2 threads, 4096×384 by 384×1536: 1362 ms against 101 ms in fp32 —
    so int8 layers there compute their int8 levels in float (``dequant``), at float speed."""
    if device_type == "cpu" and not onednn_available():
        return False
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device_type)
        return bool((torch._int_mm(a, a) == 32).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def fp8_available(device_type: str) -> bool:
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 9) and hasattr(torch, "_scaled_mm")
