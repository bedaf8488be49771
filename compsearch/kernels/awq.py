"""AWQ: activation-aware weight scaling before round-to-nearest (Lin et al., 2024, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration").

The weight columns that meet large activations matter most; scaling them up by ``s_j`` before
quantization (and the activations down by the same ``s_j``) gives them relatively finer levels.
The scale is ``s = mean|x|^α`` (normalized so its largest and smallest are reciprocal), with α
searched on a grid from 0 (no scaling: plain round-to-nearest) to 1 for the least output error of
the quantized layers on a sample of calibration inputs — so AWQ is never worse than round-to-nearest
on that sample. ``1/s`` is folded into the normalization layer feeding the layers, exactly as
SmoothQuant's (compsearch.kernels.smooth); layers no normalization layer feeds keep plain
round-to-nearest, and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compsearch.kernels._quant_grid import QuantSpec, grouped
from compsearch.kernels.formats import get_format, weight_scale
from compsearch.kernels.smooth import InputStats, Run, SmoothReport, rescale_through_norms_

GRID = 20


def quantized(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` (out × in) rounded to nearest on ``spec``'s grid, dequantized."""
    blocks = grouped(weight, spec)
    scale = weight_scale(weight, spec, None)
    return get_format(spec.w_format).fake_quantize(blocks, scale, spec).reshape(weight.shape)


def search_scale(
    stats: InputStats, layers: dict[str, nn.Module], specs: dict[str, QuantSpec]
) -> tuple[torch.Tensor, float, float, float]:
    """The input-channel scale with the least output error of ``layers`` quantized by ``specs``
    on the sample; with the α chosen and the errors at α = 0 (round-to-nearest) and at it."""
    x = stats.sample
    means = stats.means.clamp(min=1e-4)
    references = {n: x @ m.weight.detach().float().t() for n, m in layers.items()}
    errors = []
    for step in range(GRID + 1):
        alpha = step / GRID
        scale = means.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = 0.0
        for name, module in layers.items():
            weight = module.weight.detach().float()
            approx = quantized(weight * scale, specs[name]) / scale
            error += float((x @ approx.t() - references[name]).pow(2).mean())
        errors.append((error, alpha, scale))
    best = min(errors, key=lambda e: e[0])
    return best[2], best[1], errors[0][0], best[0]


@torch.no_grad()
def awq_(
    model: nn.Module, specs: dict[str, QuantSpec], batches: Iterable[Any], run: Run
) -> tuple[SmoothReport, dict[str, tuple[float, float, float]]]:
    """AWQ-scale the Linear layers in ``specs`` (name → the spec they will be quantized with) of a
    float ``model``. Returns the report and, per layer, (α, output error at α = 0, at α)."""
    found: dict[str, tuple[float, float, float]] = {}

    def rule(stats: InputStats, chosen: dict[str, nn.Module]) -> torch.Tensor:
        scale, alpha, plain, best = search_scale(stats, chosen, specs)
        found.update((name, (alpha, plain, best)) for name in chosen)
        return scale

    report = rescale_through_norms_(model, list(specs), batches, run, rule, "AWQ")
    return report, found
