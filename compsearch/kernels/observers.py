"""Observers and calibration: the ranges static activation scales and weight clipping come from.

Activation observers (for ``static`` activation quantizers):

* ``minmax`` — the largest absolute value seen;
* ``percentile`` — that percentile of absolute values (outliers clipped);
* ``mse`` — the clipping range that minimizes the int8 quantization error of what was seen.

Weight clipping: with ``mse``, each weight row / group also gets the clip ratio (of its absolute
maximum) that minimizes its quantization error; otherwise weights use their full range.

A model can be calibrated, fine-tuned, and calibrated again: each call starts from fresh statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels.formats import get_format, weight_scale
from compsearch.kernels.quant import (
    ACT_QMAX,
    ActQuantizer,
    grouped,
    quant_modules,
    rows_view,
)

OBSERVERS = ("minmax", "percentile", "mse")
SAMPLES_PER_BATCH = 1 << 16
CLIP_RATIOS = torch.linspace(1.0, 0.5, 11)


class ActObserver:
    """Collects |x| statistics: the exact maximum and a fixed-seed sample for percentile / MSE."""

    def __init__(self, kind: str, percentile: float = 99.99, seed: int = 0) -> None:
        self.kind = kind
        self.percentile = percentile
        self.amax = 0.0
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        values = x.detach().abs().reshape(-1).float()
        if values.numel() == 0:
            return
        self.amax = max(self.amax, float(values.max()))
        if self.kind != "minmax":
            if values.numel() > SAMPLES_PER_BATCH:
                index = torch.randint(
                    values.numel(), (SAMPLES_PER_BATCH,), generator=self.generator
                ).to(values.device)
                values = values[index]
            self.samples.append(values.cpu())

    def range(self) -> float:
        """The absolute value the int8 range should reach."""
        if self.kind == "minmax" or not self.samples:
            return self.amax
        values = torch.cat(self.samples).double()
        if self.kind == "percentile":
            return float(torch.quantile(values[: 1 << 24], self.percentile / 100.0))
        return _mse_range(values, self.amax)


def _mse_range(values: torch.Tensor, amax: float) -> float:
    """Clipping range in (0, amax] minimizing the int8 quantization error of ``values``."""
    best, best_error = amax, float("inf")
    for ratio in torch.linspace(1.0, 0.2, 41).tolist():
        scale = max(amax * ratio, 1e-12) / ACT_QMAX
        quantized = torch.round(values / scale).clamp(-ACT_QMAX, ACT_QMAX) * scale
        error = float((quantized - values).pow(2).mean())
        if error < best_error:
            best, best_error = amax * ratio, error
    return best


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    observer: str = "minmax",
    percentile: float = 99.99,
) -> dict[str, float]:
    """Observe ``batches`` through ``run(model, batch)`` and set every static activation scale.

    Also searches weight clipping when ``observer == "mse"``. Returns the activation range found per
    layer. Raises KernelError for an unknown observer or when no batch reached a static quantizer.
    """
    if observer not in OBSERVERS:
        raise KernelError(f"observer: expected one of {OBSERVERS}, but got {observer!r}.")
    layers = quant_modules(model)
    static = {
        name: module.input_quant
        for name, module in layers.items()
        if isinstance(module.input_quant, ActQuantizer) and module.input_quant.mode == "static"
    }
    for quantizer in static.values():
        quantizer.observer = ActObserver(observer, percentile)
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches:
            run(model, batch)
            count += 1
    finally:
        observers = {name: q.observer for name, q in static.items()}
        for quantizer in static.values():
            quantizer.observer = None
        model.train(was_training)
    if static and count == 0:
        raise KernelError("calibrate: expected at least one calibration batch, but got none.")
    ranges = {}
    for name, quantizer in static.items():
        found = observers[name].range()
        if found == 0.0:
            raise KernelError(
                f"layer {name!r}: expected calibration batches to reach its input, but it saw "
                "nothing (or only zeros). Check that the batches exercise this layer."
            )
        quantizer.set_scale(found / ACT_QMAX)
        ranges[name] = found
    set_weight_clips_(model, observer)
    return ranges


def set_weight_clips_(model: nn.Module, observer: str) -> None:
    """Every quantized weight's clip ratios: searched with ``mse``, none (1.0) otherwise. Needs no
    data, so a weight-only model is calibrated by this alone."""
    for module in quant_modules(model).values():
        if module.spec.quantizes_weight and get_format(module.spec.w_format).clip_search:
            if observer == "mse":
                search_weight_clip_(module)
            else:
                module.weight_quant.clip.fill_(1.0)


CLIP_CHUNK = 1 << 22  # weights per pass of the clip search


@torch.no_grad()
def search_weight_clip_(module: nn.Module) -> None:
    """Per row / group, the clip ratio of the absolute maximum with the least quantization error."""
    quantizer = module.weight_quant
    spec = quantizer.spec
    fmt = get_format(spec.w_format)
    weight = rows_view(module.weight, quantizer.transposed)
    step = max(1, CLIP_CHUNK // max(1, weight.shape[1]))  # rows at a time: an embedding's
    for start in range(0, weight.shape[0], step):  # temporaries stay small (rows are independent)
        rows = weight[start : start + step].float()
        shape = quantizer.clip[start : start + step].shape
        best_error = None
        best_ratio = torch.ones(shape, device=rows.device)
        for ratio in CLIP_RATIOS.tolist():
            clip = torch.full(shape, ratio, device=rows.device)
            scale = weight_scale(rows, spec, clip)
            restored = fmt.fake_quantize(grouped(rows, spec), scale, spec).reshape(rows.shape)
            error = (restored - rows).pow(2).reshape(*shape[:2], -1).sum(-1, keepdim=True)
            if best_error is None:
                best_error = error
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, clip, best_ratio)
        quantizer.clip[start : start + step].copy_(best_ratio)
