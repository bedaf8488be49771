"""Proxy costs — MACs and BitOps. Always labelled as proxies: they are not latency.

MACs are counted by running the model once under ``torch.utils.flop_counter.FlopCounterMode``
(every matmul / convolution / attention the forward really executes), divided by two.
BitOps weigh each layer's MACs by ``w_bits × a_bits`` (the measure other tools report as cost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compsearch.objectives.base import Candidate, Objective


def count_macs(model: nn.Module, run: Callable[[nn.Module], Any]) -> int:
    """Multiply-accumulates of one forward (``run(model)``), as executed."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(model)
    return int(counter.get_total_flops() // 2)


def count_macs_by_layer(model: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, int]:
    """MACs per module name (leaf layers), from the same counter."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(model)
    flops = counter.get_flop_counts()
    names = {name for name, module in model.named_modules() if not list(module.children())}
    prefix = type(model).__name__ + "."
    out = {}
    for key, counts in flops.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in names:
            out[name] = int(sum(counts.values()) // 2)
    return out


def bitops(macs_by_layer: dict[str, int], bits: dict[str, tuple[int, int]]) -> int:
    """Σ MACs × w_bits × a_bits; layers without an entry count as 32 × 32 (float)."""
    return sum(macs * bits.get(name, (32, 32))[0] * bits.get(name, (32, 32))[1]
               for name, macs in macs_by_layer.items())  # fmt: skip


class MacsObjective(Objective):
    """MACs of the compressed model's forward (a proxy; it is not latency)."""

    name = "macs"
    direction = "minimize"
    unit = "MACs"
    proxy = True

    def measure(self, candidate: Candidate) -> dict[str, float]:
        from compsearch.kernels.quant import float_forward
        from compsearch.tasks.base import move

        model = candidate.student if candidate.student is not None else candidate.deployed
        batch = move(candidate.task.example_inputs(), next(model.parameters()).device)
        with float_forward():
            by_layer = count_macs_by_layer(model, lambda m: candidate.task.forward(m, batch))
            total = count_macs(model, lambda m: candidate.task.forward(m, batch))
        return {self.name: float(total), "bitops": float(bitops(by_layer, candidate.quant_bits))}


class BitOpsObjective(MacsObjective):
    """Σ MACs × w_bits × a_bits (a proxy; it is not latency)."""

    name = "bitops"
    unit = "bit-ops"

    def measure(self, candidate: Candidate) -> dict[str, float]:
        counted = super().measure(candidate)
        return {self.name: counted["bitops"], "macs": counted["macs"]}
