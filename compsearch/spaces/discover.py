"""What a model offers to compress, found from the model itself.

Quantizable layers (and which share a weight), prunable channel groups (coupled layers make one
decision), droppable blocks, named regions (from the task: e.g. vision encoder, projector, language
model), the first layer that runs and the output layers — all from one traced forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from compsearch.errors import SpaceError
from compsearch.fingerprint import model_fingerprint
from compsearch.kernels.deploy import layer_kind
from compsearch.kernels.devices import EXPERTS
from compsearch.kernels.prune import Analysis, Group, analyze
from compsearch.kernels.quant import conv1d_class, is_quantizable, rows_view, stacked_params
from compsearch.tasks.base import Task


@dataclass
class ModelInfo:
    layers: dict[str, str]  # quantizable layer -> kind (linear, conv2d, embedding, experts)
    fan_in: dict[str, int]
    ties: list[set[str]]  # layers that share one weight
    groups: dict[str, Group]
    blocks: list[str]
    block_of: dict[str, str]  # module -> the stack element (block) that contains it
    regions: dict[str, list[str]]  # region -> module prefixes
    first_layer: str | None
    output_layers: list[str]
    fingerprint: str

    def region_of(self, name: str) -> str | None:
        for region, prefixes in self.regions.items():
            for prefix in prefixes:
                if name == prefix or name.startswith(prefix + "."):
                    return region
        return None


def discover(task: Task, model: nn.Module | None = None) -> ModelInfo:
    """Discover ``task``'s teacher (or ``model``): layers, groups, blocks, regions."""
    model = task.teacher() if model is None else model
    example = task.calibration_batches(1)[0]
    analysis: Analysis = analyze(model, lambda m: task.forward(m, example))
    modules = dict(model.named_modules())
    layers = {}
    fan_in = {}
    owners: dict[int, set[str]] = {}
    for name, module in modules.items():
        if name and is_quantizable(module):
            layers[name] = layer_kind(module)
            weight = module.weight
            conv1d = conv1d_class()
            transposed = conv1d is not None and isinstance(module, conv1d)
            fan_in[name] = rows_view(weight, transposed).shape[1]
            owners.setdefault(id(weight), set()).add(name)
        elif name and stacked_params(module):  # MoE experts: one decision for all their matrices
            layers[name] = EXPERTS
            fan_in[name] = math.gcd(
                *(module._parameters[p].shape[-1] for p in stacked_params(module))
            )
    ties = [names for names in owners.values() if len(names) > 1]
    regions = task.regions(model)
    for region, prefixes in regions.items():
        for prefix in prefixes:
            if prefix not in modules:
                raise SpaceError(
                    f"task {task.name!r} region {region!r}: expected module prefixes of the model, "
                    f"but {prefix!r} is not a module."
                )
    stack = {}
    for container_name, container in modules.items():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            for child in container._modules:
                stack[f"{container_name}.{child}" if container_name else child] = True
    block_of = {}
    for name in modules:
        best = None
        for candidate in stack:
            if (name == candidate or name.startswith(candidate + ".")) and (
                best is None or len(candidate) < len(best)
            ):
                best = candidate
        if best is not None:
            block_of[name] = best
    order = [n for n in analysis.trace.order if n in layers]
    outputs = [n for n in order if n in analysis.output_layers and n in layers]
    return ModelInfo(
        layers=layers,
        fan_in=fan_in,
        ties=ties,
        groups=analysis.groups,
        blocks=list(analysis.blocks),
        block_of=block_of,
        regions=regions,
        first_layer=order[0] if order else None,
        output_layers=_final(outputs, analysis),
        fingerprint=model_fingerprint(model),
    )


def _final(outputs: list[str], analysis: Analysis) -> list[str]:
    """Output layers: those whose outputs are the model's output. Where a whole residual stream is
    the output (an encoder), only the last layer that writes it counts."""
    if len(outputs) <= 1:
        return outputs
    streams = [g for g in analysis.groups.values() if g.kind == "stream" and not g.prunable]
    in_stream = {layer for g in streams for layer in g.layers}
    alone = [n for n in outputs if n not in in_stream]
    return alone or outputs[-1:]
