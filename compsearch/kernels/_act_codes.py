"""Activation codes for the deploy kernels: int8 levels of a layer's input, static or per token.
See :mod:`compsearch.kernels.deploy`."""

from __future__ import annotations

import torch

from compsearch.kernels._quant_grid import ACT_QMAX, SCALE_MIN


def quantize_u8_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Codes ``round(x / scale) + 128`` in [1, 255] as uint8 (int8 levels, zero point 128)."""
    codes = torch.round(x * (1.0 / scale))
    return codes.clamp_(-ACT_QMAX, ACT_QMAX).add_(128).to(torch.uint8)


def quantize_s8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8)


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True).float().clamp_(min=SCALE_MIN) / ACT_QMAX


def input_qdq(x: torch.Tensor, mode: str | None, scale: float | None) -> torch.Tensor:
    """The int8 levels a layer with ``a_bits: 8`` reads (``mode`` static or dynamic), for kernels
    that compute in float: the deploy form computes what the fake-quant model trained on."""
    if mode is None:
        return x
    s = scale if mode == "static" else per_token_scale(x)
    return (torch.round(x / s).clamp_(-ACT_QMAX, ACT_QMAX) * s).to(x.dtype)
