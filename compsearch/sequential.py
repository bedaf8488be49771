"""Calibration one block at a time, from the weight file: how a model too big to hold in float is
quantized (a 7B model on one GPU, say).

``compress_sequentially(task, recipe, target)`` writes the same artifact ``pipeline.compress`` would
for a calibration-only recipe (weight quantization by round-to-nearest or GPTQ, no pruning, no
fine-tuning), but never holds the float model: the architecture is built with its parameters on
the ``meta`` device, the parts outside the numbered blocks (embedding, final norm, head) are read
from the task's weight file, and then, for each block in order, its float weights are read,
quantized — GPTQ on the stored outputs of the blocks before it, already quantized — run once to
give the next block its inputs, packed into their stored form, and dropped. Peak memory is one
block in float, its calibration inputs and GPTQ's Hessians, plus the packed blocks done so far and
the file, memory-mapped in its own storage format.

What it takes, checked before any work: every quantized layer in the numbered blocks of one
``ModuleList`` or outside all of them; weight-only plans (no int8 activations, SmoothQuant or AWQ:
those measure activations of the whole model first); no pruning; ``finetune_steps: 0``. Each
refusal names the path that takes the recipe (``compsearch train`` in memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compsearch.errors import RecipeError
from compsearch.fingerprint import named_fingerprint
from compsearch.kernels._quant_stacked import stacked_params
from compsearch.kernels.gptq import GPTQReport, block_inputs, block_outputs, gptq_block_
from compsearch.kernels.observers import set_weight_clips_
from compsearch.kernels.packing import PackedModel, export_packed, save_packed
from compsearch.kernels.prune import PruneRecord
from compsearch.kernels.quant import (
    QuantReport,
    is_quantizable,
    left_in_float,
    quant_modules,
    quantize_,
    unquantize_uncalled_,
)
from compsearch.pipeline import artifact_metadata, checked
from compsearch.recipes import validate
from compsearch.recipes.schema import Recipe
from compsearch.tasks.base import Task, move


@dataclass
class SequentialResult:
    """What :func:`compress_sequentially` wrote and did."""

    path: Path
    bytes: int
    blocks: int  # numbered blocks done one at a time
    quant_report: QuantReport
    largest_block_mb: float  # the most float weight memory one block held
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def compress_sequentially(
    task: Task, recipe: Recipe, target: str | Path, device: str | torch.device = "cpu"
) -> SequentialResult:
    """Write ``recipe`` applied to ``task``'s model to ``target`` (a compsearch artifact), one block
    in float at a time (see the module docstring)."""
    started = time.perf_counter()
    device = torch.device(device)
    recipe = checked(recipe)
    if recipe.provenance.task is None:
        recipe = dataclasses.replace(
            recipe, provenance=dataclasses.replace(recipe.provenance, task=task.name)
        )
    _refuse_unsupported(recipe)
    model, weights = task.weight_file()
    validate(recipe, model, check_fingerprint=False)
    wanted = recipe.provenance.model_fingerprint
    if wanted is not None and _fingerprint(model, weights) != wanted:
        raise RecipeError(
            f"recipe.provenance.model_fingerprint: the recipe was made for {wanted}, not for the "
            f"model in {weights}. Apply it to the model it was made for."
        )
    names = [n for n, m in model.named_modules() if n and (is_quantizable(m) or stacked_params(m))]
    plans = {n: p for n, p in recipe.resolve(names).items()
             if p.w_bits not in (None, 16)}  # fmt: skip
    container, blocks = _blocks(model, plans)
    inside = f"{container}."
    weights.load_into(model, lambda name: not name.startswith(inside))
    restore = _without_blocks(model, container)
    model.to(device)  # everything but the blocks, which are still on meta
    restore()
    report = QuantReport()
    outer = {n: p for n, p in plans.items() if not n.startswith(inside)}
    _quantize_scope(model, "", outer, recipe, report)
    wants_gptq = any(p.method == "gptq" for p in plans.values())
    batches = task.calibration_batches(recipe.calibration.batches if wants_gptq else 1)
    run = _runner(task, device)
    chain = block_inputs(model, blocks[0], batches, run)
    timings = {"setup": time.perf_counter() - started}
    done = _Done(report)
    for index, block in enumerate(blocks):
        prefix = f"{container}.{index}"
        weights.load_into(model, lambda name, p=f"{prefix}.": name.startswith(p))
        scoped = {n[len(prefix) + 1 :]: p for n, p in plans.items() if n.startswith(f"{prefix}.")}
        chain = _calibrate_block(block.to(device), prefix, scoped, recipe, chain, done,
                                 last=index + 1 == len(blocks))  # fmt: skip
        block.to("meta")  # its float weights are let go; the packed form is kept
        _return_freed_memory()
    timings["blocks"] = time.perf_counter() - started - timings["setup"]
    report.rounding.update(done.gptq.notes())
    restore = _without_blocks(model, container)
    try:
        done.add("", model, export_packed(model))
    finally:
        restore()
    report.float_share = done.left_elements / max(1, done.elements)
    path = save_packed(_merged(done.parts), target, artifact_metadata(recipe, PruneRecord()))
    timings["total"] = time.perf_counter() - started
    return SequentialResult(path, path.stat().st_size, len(blocks), report, done.largest_mb,
                            timings)  # fmt: skip


@dataclass
class _Done:
    """What the blocks done so far gave: their packed forms and their share of the report."""

    report: QuantReport
    gptq: GPTQReport = field(default_factory=GPTQReport)
    parts: list[tuple[str, PackedModel]] = field(default_factory=list)
    largest_mb: float = 0.0
    left_elements: int = 0  # weight elements (2-D or more) left in float, and all of them
    elements: int = 0

    def add(self, prefix: str, scope: nn.Module, packed: PackedModel) -> None:
        left, _ = left_in_float(scope, _relative(self.report.skipped, prefix))
        dot = f"{prefix}." if prefix else ""
        self.report.left_float.update((dot + n, why) for n, why in left.items())
        self.left_elements += sum(scope.get_parameter(n).numel() for n in left)
        self.elements += sum(p.numel() for p in scope.parameters() if p.dim() >= 2)
        self.parts.append((prefix, _merged([("", packed)])))  # kept on the CPU


def _calibrate_block(block: nn.Module, prefix: str, plans: dict, recipe: Recipe, chain: list,
                     done: _Done, last: bool) -> list:  # fmt: skip
    """Quantize ``block`` (its float weights just read) as ``plans`` say, GPTQ on ``chain`` (its
    stored inputs), pack it into ``done``; returns the next block's inputs."""
    done.largest_mb = max(
        done.largest_mb, sum(p.numel() * p.element_size() for p in block.parameters()) / 2**20
    )
    _quantize_scope(block, prefix, plans, recipe, done.report)
    _unquantize_uncalled(block, prefix, chain[0], done.report)
    layers = {f"{prefix}.{n}": m for n, m in quant_modules(block).items()
              if plans.get(n) is not None and plans[n].method == "gptq"}  # fmt: skip
    if layers:
        gptq_block_(block, layers, chain, done.gptq)
    following = chain if last else block_outputs(block, chain)
    done.add(prefix, block, export_packed(block))
    return following


def _refuse_unsupported(recipe: Recipe) -> None:
    later = "; calibrate it in memory (`compsearch train` without --one-block-at-a-time)"
    for key, plan in recipe.layers.items():
        if plan.a_bits == 8 or plan.smooth is not None:
            raise RecipeError(f"recipe.layers[{key!r}]: calibrating one block at a time takes "
                              f"weight-only recipes, but this one quantizes inputs{later}.")  # fmt: skip
        if plan.method == "awq":
            raise RecipeError(f"recipe.layers[{key!r}]: method awq scales through normalization "
                              f"layers measured on the whole model{later}.")  # fmt: skip
        if (plan.keep_ratio is not None and plan.keep_ratio < 1) or plan.keep is False:
            raise RecipeError(f"recipe.layers[{key!r}]: calibrating one block at a time does not "
                              f"prune{later}.")  # fmt: skip
    if recipe.finetune.steps:
        raise RecipeError(f"finetune.steps: calibrating one block at a time does not fine-tune "
                          f"(expected 0, got {recipe.finetune.steps}){later}.")  # fmt: skip


def _blocks(model: nn.Module, plans: dict) -> tuple[str, list[nn.Module]]:
    """The ``ModuleList`` whose numbered children hold the quantized layers inside blocks."""
    found = {m.group(1) for n in plans if (m := re.match(r"(.+?)\.\d+\.", n))}
    if len(found) != 1:
        lists = sorted({n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)})
        raise RecipeError(
            "calibrating one block at a time expected the quantized layers in the numbered blocks "
            f"of one ModuleList (the model's {lists[:3]}), but they are in "
            f"{sorted(found) or 'none'}; calibrate it in memory (`compsearch train` without "
            "--one-block-at-a-time)."
        )
    container = found.pop()
    blocks = model.get_submodule(container)
    if not isinstance(blocks, nn.ModuleList):
        raise RecipeError(f"calibrating one block at a time expected {container!r} to be a "
                          f"ModuleList of blocks, but it is a {type(blocks).__name__}.")  # fmt: skip
    return container, list(blocks)


def _quantize_scope(scope: nn.Module, prefix: str, plans: dict, recipe: Recipe,
                    report: QuantReport) -> None:  # fmt: skip
    """``quantize_`` of ``scope``'s layers with their resolved plans, weight clipping as the
    recipe's observer sets it, the report's names made whole."""
    if not plans:
        return
    part = quantize_(scope, plans, recipe.calibration.activation_mode)
    dot = f"{prefix}." if prefix else ""
    report.quantized.update((dot + n, spec) for n, spec in part.quantized.items())
    report.skipped.update((dot + n, why) for n, why in part.skipped.items())
    report.tied.update((dot + n, dot + t) for n, t in part.tied.items())
    set_weight_clips_(scope, recipe.calibration.observer)  # weight-only: no activation ranges


def _unquantize_uncalled(block: nn.Module, prefix: str, first: tuple, report: QuantReport) -> None:
    """As ``pipeline.compress``: a Quant layer the block never calls goes back to float."""
    reverted = unquantize_uncalled_(block, lambda m: m(*first[0], **first[1]))
    for name, why in reverted.items():
        report.quantized.pop(f"{prefix}.{name}", None)
        report.skipped[f"{prefix}.{name}"] = why


def _relative(reasons: dict[str, str], prefix: str) -> dict[str, str]:
    if not prefix:
        return dict(reasons)
    return {n[len(prefix) + 1 :]: why for n, why in reasons.items() if n.startswith(f"{prefix}.")}


def _without_blocks(model: nn.Module, container: str):
    """Takes the blocks' ``ModuleList`` out of ``model`` (so its state dict is the rest); returns
    the function that puts it back."""
    owner_name, _, leaf = container.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    blocks = owner._modules[leaf]
    owner._modules[leaf] = nn.ModuleList()

    def restore() -> None:
        owner._modules[leaf] = blocks

    return restore


def _merged(parts: list[tuple[str, PackedModel]]) -> PackedModel:
    out = PackedModel({}, {}, {}, {}, {})
    for prefix, part in parts:
        dot = f"{prefix}." if prefix else ""
        out.weights.update((dot + n, dataclasses.replace(w, data=w.data.cpu(), scale=w.scale.cpu()))
                           for n, w in part.weights.items())  # fmt: skip
        out.input_scales.update((dot + n, s) for n, s in part.input_scales.items())
        out.activation_modes.update((dot + n, m) for n, m in part.activation_modes.items())
        out.floats.update((dot + n, t.cpu()) for n, t in part.floats.items())
        out.ties.update((dot + n, dot + t) for n, t in part.ties.items())
    return out


def _fingerprint(model: nn.Module, weights) -> str:
    """The model's fingerprint (``compsearch.fingerprint``), its meta tensors read from the file
    one at a time."""
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name, param in model.named_parameters():  # a tied parameter is stored under its first name
        first.setdefault(id(param), name)

    def tensors():
        for name, tensor in sorted(state.items()):
            if tensor.is_meta:
                source = first.get(id(tensor), name)
                yield name, weights.read([source])[source].to(tensor.dtype)
            else:
                yield name, tensor

    return named_fingerprint(tensors())


def _return_freed_memory() -> None:
    """Hand the memory of the block just let go back to the system. glibc keeps freed blocks in
    its arenas, where the next block's tensors of other sizes do not fit them: without this, the
    resident size grew by about 35 MB per SmolLM2 block (measured) though nothing was kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _runner(task: Task, device: torch.device):
    return lambda model, batch: task.forward(model, move(batch, device))
