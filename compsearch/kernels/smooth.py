"""SmoothQuant: activation outliers migrated into the weights, so int8 activations stay accurate
(Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models").

A few input channels of a transformer's linear layers carry values 10–100× the rest, and one
activation scale per tensor (or per token) spends its levels on them. For a layer ``y = W x``,
``y = (W diag(s)) (diag(s)⁻¹ x)`` for any positive ``s``; with ``s_j = max|x_j|^α /
max|W_:j|^(1−α)`` the activation's channels are flattened and the weight's columns take up the
difference (α = 0.5 splits it evenly). ``diag(s)⁻¹`` is folded into the normalization layer that
produces ``x`` (its weight and bias), so the deploy form runs no extra operation; every linear
layer that reads the same normalized tensor gets the same ``s`` (q/k/v; gate/up).

Only layers fed directly by a normalization layer (a module named ``…Norm`` with a per-channel
weight) can be smoothed; the others (an attention output, a down projection) are left as they are
and reported. The change is exact in float: it is checked on a calibration batch and undone if the
model's output moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compsearch.kernels.fuse import _compare, _Trace, exact_float32

Run = Callable[[nn.Module, Any], Any]
TOLERANCE = 1e-4


@dataclass
class SmoothReport:
    """Per normalization layer: the layers smoothed through it, and the spread of the input's
    per-channel maxima (largest / median) before and after; layers that could not be smoothed."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    spread_before: dict[str, float] = field(default_factory=dict)
    spread_after: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


@dataclass
class InputStats:
    """What the calibration batches fed one normalization layer's readers: per input channel the
    largest and the mean magnitude, and up to ``SAMPLE_ROWS`` of the rows themselves."""

    maxima: torch.Tensor
    means: torch.Tensor
    sample: torch.Tensor


SAMPLE_ROWS = 4096
ScaleRule = Callable[["InputStats", dict[str, nn.Module]], torch.Tensor]


@torch.no_grad()
def smooth_(
    model: nn.Module, layers: dict[str, float], batches: Iterable[Any], run: Run
) -> SmoothReport:
    """SmoothQuant the Linear ``layers`` (name → α) of a float ``model`` on ``batches``."""

    def rule(stats: InputStats, chosen: dict[str, nn.Module]) -> torch.Tensor:
        return _scales(stats.maxima, list(chosen.values()), max(layers[n] for n in chosen))

    return rescale_through_norms_(model, list(layers), batches, run, rule, "SmoothQuant")


@torch.no_grad()
def rescale_through_norms_(
    model: nn.Module,
    layers: list[str],
    batches: Iterable[Any],
    run: Run,
    rule: ScaleRule,
    what: str,
) -> SmoothReport:
    """Scale the input channels of the Linear ``layers`` by ``rule(stats, chosen layers)`` — the
    weights' columns times ``s``, the normalization layer that feeds them divided by it — for every
    normalization layer that feeds some of them; exact in float, checked, undone if not."""
    report = SmoothReport()
    batches = list(batches)
    modules = dict(model.named_modules())
    trace = _Trace(model, lambda m: isinstance(m, nn.Linear) or _is_norm(m))
    try:
        with exact_float32():
            before = run(model, batches[0])
    finally:
        trace.close()
    norms = {n: t for n, t in trace.outputs.items() if _is_norm(modules[n])}
    readers: dict[str, list[str]] = {}
    for name in trace.inputs:
        if isinstance(modules[name], nn.Linear):
            producer = trace.fed_by(name, norms)
            if producer is not None:
                readers.setdefault(producer, []).append(name)
    chosen: dict[str, list[str]] = {}
    for name in layers:
        producer = next((p for p, names in readers.items() if name in names), None)
        if producer is None:
            report.skipped[name] = (
                f"{what} folds its scale into a normalization layer, and none feeds this "
                "layer directly; it is left unscaled"
            )
        elif trace.calls.get(producer, 0) != 1:
            report.skipped[name] = f"its normalization layer {producer!r} runs more than once"
        else:
            chosen.setdefault(producer, []).append(name)
    if not chosen:
        return report
    stats = _input_stats(model, {p: readers[p][0] for p in chosen}, batches, run, modules)
    saved = {p: _state(modules[p], [modules[n] for n in readers[p]]) for p in chosen}
    for producer, names in chosen.items():
        scale = rule(stats[producer], {n: modules[n] for n in names})
        readers_of = [modules[n] for n in readers[producer]]  # every reader, chosen or not
        _fold(modules[producer], readers_of, scale)
        report.groups[producer] = sorted(names)
        report.spread_before[producer] = _spread(stats[producer].maxima)
        report.spread_after[producer] = _spread(stats[producer].maxima / scale)
    with exact_float32():
        after = run(model, batches[0])
    try:
        _compare(before, after, TOLERANCE, f"{what}'s folding")
    except Exception:
        for producer, state in saved.items():  # undone: the model is as it was
            _restore(modules[producer], [modules[n] for n in readers[producer]], state)
        raise
    return report


def _input_stats(model, first_reader: dict[str, str], batches, run, modules):
    found: dict[str, list] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            entry = found.setdefault(name, [None, 0.0, 0, []])
            amax = x.abs().amax(0)
            entry[0] = amax if entry[0] is None else torch.maximum(entry[0], amax)
            entry[1] = entry[1] + x.abs().sum(0)
            entry[2] += x.shape[0]
            if sum(len(rows) for rows in entry[3]) < SAMPLE_ROWS:
                entry[3].append(x[:SAMPLE_ROWS])

        return record

    handles = [modules[reader].register_forward_pre_hook(hook(producer))
               for producer, reader in first_reader.items()]  # fmt: skip
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: InputStats(amax, total / count, torch.cat(rows)[:SAMPLE_ROWS])
        for name, (amax, total, count, rows) in found.items()
    }


def _scales(act_max: torch.Tensor, readers: list[nn.Module], alpha: float) -> torch.Tensor:
    weight_max = torch.stack([m.weight.detach().abs().amax(0) for m in readers]).amax(0).float()
    scale = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scale.clamp(min=1e-5)


def _fold(norm: nn.Module, readers: list[nn.Module], scale: torch.Tensor) -> None:
    norm.weight.div_(scale.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scale.to(norm.bias.dtype))
    for module in readers:
        module.weight.mul_(scale.to(module.weight.dtype))


def _state(norm: nn.Module, readers: list[nn.Module]) -> list[torch.Tensor]:
    tensors = [norm.weight, *([norm.bias] if getattr(norm, "bias", None) is not None else [])]
    return [t.detach().clone() for t in tensors + [m.weight for m in readers]]


def _restore(norm: nn.Module, readers: list[nn.Module], state: list[torch.Tensor]) -> None:
    tensors = [norm.weight, *([norm.bias] if getattr(norm, "bias", None) is not None else [])]
    for tensor, value in zip(tensors + [m.weight for m in readers], state, strict=True):
        tensor.data.copy_(value)


def _spread(maxima: torch.Tensor) -> float:
    return float(maxima.max() / maxima.median().clamp(min=1e-12))
