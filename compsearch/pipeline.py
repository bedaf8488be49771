"""``compress(task, recipe)`` — the one path a search trial and the final training run both take.

    prune (k steps, fine-tuning between; BatchNorm statistics refreshed after each) → fold
    BatchNorm → quantize (fake) → calibrate → distill-finetune → re-calibrate → deploy form

With ``order: quantize_first`` (the source article's ordering) quantization and calibration come
before pruning instead; nothing else changes. The result says what was done: the pruning record,
the quantized and skipped layers, the kernel of every deployed layer, and the time of each phase.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compsearch.errors import KernelError, RecipeError
from compsearch.kernels.awq import awq_
from compsearch.kernels.deploy import DeployReport, to_deploy
from compsearch.kernels.formats import get_format
from compsearch.kernels.fuse import fold_batchnorm_, recalibrate_batchnorm_
from compsearch.kernels.gptq import gptq_
from compsearch.kernels.observers import calibrate
from compsearch.kernels.packing import PackedModel, export_packed, packed_to_bytes, save_packed
from compsearch.kernels.prune import (
    Analysis,
    PruneRecord,
    PruneReport,
    analyze,
    prune_,
    replay_,
    scaled_plans,
    taylor_gradients,
)
from compsearch.kernels.quant import (
    QuantReport,
    is_quantizable,
    learn_scales_,
    left_in_float,
    quant_modules,
    quantize_,
    spec_from_plan,
    unquantize_uncalled_,
)
from compsearch.kernels.smooth import smooth_
from compsearch.recipes import dumps, validate
from compsearch.recipes.schema import Recipe
from compsearch.tasks.base import Task, move
from compsearch.tasks.teacher_outputs import CacheSpec, TeacherCache, TeacherStream
from compsearch.train import Checkpointing, Distiller, StepCallback, TrainResult, finetune

DEFAULT_POOL_BATCHES = 64


@dataclass
class CompressedModel:
    """What :func:`compress` produced and what it did."""

    recipe: Recipe
    student: nn.Module  # the trained fake-quant model
    deployed: nn.Module  # the form that ships, on the target device
    deploy_report: DeployReport
    quant_report: QuantReport
    prune_record: PruneRecord
    prune_report: PruneReport
    train: TrainResult
    timings: dict[str, float] = field(default_factory=dict)

    def packed(self) -> PackedModel:
        return export_packed(self.student)

    def metadata(self) -> dict[str, str]:
        return artifact_metadata(self.recipe, self.prune_record)

    def artifact_bytes(self) -> bytes:
        """The artifact exactly as :meth:`save` writes it."""
        return packed_to_bytes(self.packed(), self.metadata())

    def save(self, path: str | Path) -> Path:
        return save_packed(self.packed(), path, self.metadata())


def artifact_metadata(recipe: Recipe, record: PruneRecord) -> dict[str, str]:
    """What an artifact carries besides its tensors: the recipe and the pruning record."""
    return {
        "compsearch.recipe": dumps(recipe),
        "compsearch.prune_record": json.dumps(record.to_dict()),
    }


def default_cache(task: Task, recipe: Recipe, steps: int, device) -> TeacherCache | TeacherStream:
    """Teacher outputs for one run (a study shares one cache across its trials): a pool of one
    batch per step for a short run; for a run longer than ``DEFAULT_POOL_BATCHES`` steps (the
    final run) a stream, so every step trains on a new batch of the training data."""
    batch_size = recipe.finetune.batch_size or task.default_batch_size
    spec = CacheSpec(
        batches=max(1, min(steps, DEFAULT_POOL_BATCHES)),
        batch_size=batch_size,
        seed=recipe.finetune.seed,
        feature_layers=tuple(feature_layers(task, recipe, None)),
        attentions=recipe.distill.attn_weight > 0,
    )
    if steps > DEFAULT_POOL_BATCHES:
        return TeacherStream(task, spec, device)
    return TeacherCache(task, spec, device=device)


def feature_layers(task: Task, recipe: Recipe, model: nn.Module | None) -> list[str]:
    if recipe.distill.feature_weight <= 0:
        return []
    if recipe.distill.feature_layers:
        return list(recipe.distill.feature_layers)
    return task.default_feature_layers(model if model is not None else task.teacher())


def checked(recipe: Recipe) -> Recipe:
    """The recipe through the strict parser (recipes built in Python skip the YAML checks), and
    every layer's weight format known and able to take the layer's plan."""
    recipe = Recipe.from_dict(recipe.to_dict())
    for key, plan in recipe.layers.items():
        if plan.w_format is None and plan.w_bits in (None, 16):
            continue
        path = f"recipe.layers[{key!r}]"
        try:
            refused = get_format(plan.w_format).check(spec_from_plan(plan))
        except KernelError as error:
            raise RecipeError(f"{path}.{error}") from None
        if refused:
            raise RecipeError(f"{path}: {refused}.")
    return recipe


def compress(
    task: Task,
    recipe: Recipe,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    cache: TeacherCache | TeacherStream | None = None,
    progress: StepCallback | None = None,
    checkpoint: Checkpointing | None = None,
    on_structure: Callable[[nn.Module, dict[str, str]], None] | None = None,
) -> CompressedModel:
    """Compress ``task``'s teacher as ``recipe`` says, with ``steps`` fine-tune steps (default: the
    recipe's budget). Every input is checked before any long work starts.

    ``on_structure(student, metadata)`` is called once the architecture and formats are final
    (after the last pruning step and quantization, before the last fine-tune stage): what depends
    only on them — size, latency — can be measured there, before the training that decides
    accuracy. ``metadata`` is what the artifact will carry besides its tensors, so
    ``packed_to_bytes(export_packed(student), metadata)`` has exactly the saved file's length.
    """
    timings: dict[str, float] = {}
    device = torch.device(device)
    with _timed(timings, "setup"):
        recipe = checked(recipe)
        if recipe.provenance.task is None:  # built in Python: the artifact still names its task
            recipe = dataclasses.replace(
                recipe, provenance=dataclasses.replace(recipe.provenance, task=task.name)
            )
        total = recipe.finetune.steps if steps is None else steps
        if total < 0:
            raise RecipeError(f"steps: expected an integer >= 0, but got {total}.")
        student = task.teacher()
        validate(recipe, student)
        layers = feature_layers(task, recipe, student)
        _check_feature_layers(student, layers)
        example = move(task.calibration_batches(1)[0], device)
        student.to(device)

        def run(model: nn.Module):
            return task.forward(model, example)

        if cache is None:
            cache = default_cache(task, recipe, total, device)
        _check_cache(cache, recipe, layers)
    stages = _split(total, recipe.prune.steps)
    distiller = Distiller(task, cache, recipe.distill, layers)
    trained: list[TrainResult] = []
    offset = [0]

    def train_stage(index: int, model: nn.Module) -> None:
        if not stages[index]:
            return
        stage_checkpoint = None
        if checkpoint is not None:
            stage_checkpoint = dataclasses.replace(
                checkpoint, directory=checkpoint.directory / f"stage-{index}"
            )
        with _timed(timings, "finetune"):
            result = finetune(
                model, distiller, recipe.finetune, device, stages[index],
                _shifted(progress, offset[0]), stage_checkpoint,
            )  # fmt: skip
        offset[0] += stages[index]
        trained.append(result)

    record, report = PruneRecord(), PruneReport()
    quant_report = QuantReport()
    analysis: Analysis | None = None
    quantize_first = recipe.order == "quantize_first"
    if quantize_first:
        quant_report = _quantize(student, recipe, task, run, timings, device)
    steps_of_pruning = recipe.prune.steps
    for index in range(steps_of_pruning):
        with _timed(timings, "prune"):
            plans = scaled_plans(recipe, lambda r: r ** (1.0 / steps_of_pruning), index == 0)
            grads = _taylor(student, task, cache, recipe, device) if _wants_taylor(recipe) else None
            analysis = analyze(student, run) if recipe.distill.attn_weight > 0 else analysis
            step_record, step_report = prune_(
                student, plans, run, recipe.prune.importance, recipe.prune.round_to,
                recipe.finetune.seed, grads,
            )  # fmt: skip
            record = record.then(step_record)
            report = _merge(report, step_report)
            if step_report.pruned or step_report.dropped_blocks:
                recalibrate_batchnorm_(student, _calibration(task, recipe), _runner(task, device))
            if analysis is not None:  # attention distillation compares the heads the student kept
                distiller.head_index = _last_heads(analysis, record)
            _check_feature_layers(student, layers)
        last = index == steps_of_pruning - 1
        if last and not quantize_first:
            remaining = _without_dropped(recipe, record.dropped_blocks)
            quant_report = _quantize(student, remaining, task, run, timings, device)
        if last and on_structure is not None:
            on_structure(student, artifact_metadata(recipe, record))
        train_stage(index, student)
    if total > 0:
        with _timed(timings, "calibrate"):
            _recalibrate(student, task, recipe, device)
    # every float weight with why (a layer skipped by the recipe's pattern says why it was)
    quant_report.left_float, quant_report.float_share = left_in_float(student, quant_report.skipped)
    with _timed(timings, "deploy"):
        deployed, deploy_report = to_deploy(student, device, run)
    result = TrainResult(
        sum(r.steps for r in trained),
        [loss for r in trained for loss in r.losses],
        sum(r.seconds for r in trained),
    )
    return CompressedModel(
        recipe, student, deployed, deploy_report, quant_report, record, report, result, timings
    )


def _quantize(student, recipe, task, run, timings, device) -> QuantReport:
    wants = any(
        plan.w_bits not in (None, 16) or plan.a_bits == 8
        for plan in recipe.resolve(name for name, _ in student.named_modules() if name).values()
    )
    if not wants:
        return QuantReport()
    with _timed(timings, "quantize"):
        fold_batchnorm_(student, run)
        scaling = _smooth(student, recipe, task, device)
        _awq(student, recipe, task, device, scaling)
        report = quantize_(student, recipe, recipe.calibration.activation_mode)
        report.skipped.update(unquantize_uncalled_(student, run))
        for name in ("smoothed", "rounding", "skipped"):
            getattr(report, name).update(getattr(scaling, name))
    with _timed(timings, "calibrate"):
        _calibrate(student, task, recipe, device)
    gptq_layers = [name for name in report.quantized if recipe.plan_for(name).method == "gptq"]
    if gptq_layers:
        with _timed(timings, "gptq"):
            _gptq(student, gptq_layers, task, recipe, device, report)
    if recipe.calibration.learnable_scales:
        learn_scales_(student)
    return report


def _smooth(student, recipe, task, device) -> QuantReport:
    """SmoothQuant, on the float model, for the Linear layers whose plan has ``smooth`` and int8
    activations; what it did and what it could not do, as report entries."""
    out = QuantReport()
    layers = [n for n, m in student.named_modules() if n and is_quantizable(m)]
    linear = {n for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    asked = {n: p for n, p in recipe.resolve(layers).items() if p.smooth is not None}
    wanted = {n: p.smooth for n, p in asked.items() if n in linear and p.a_bits == 8}
    for name in asked.keys() - wanted.keys():  # said, never silently ignored
        out.skipped[f"{name}:smooth"] = (
            "SmoothQuant takes a Linear layer with int8 activations (a_bits: 8); this one keeps "
            "its activations as they are"
        )
    if not wanted:
        return out
    result = smooth_(student, wanted, _calibration(task, recipe), _runner(task, device))
    for norm, layers in result.groups.items():
        for name in layers:
            out.smoothed[name] = (
                f"smoothquant α={wanted[name]:g} through {norm}: input channel maxima spread "
                f"{result.spread_before[norm]:.1f}× → {result.spread_after[norm]:.1f}× the median"
            )
    out.skipped.update((f"{name}:smooth", reason) for name, reason in result.skipped.items())
    return out


def _awq(student, recipe, task, device, out: QuantReport) -> None:
    """AWQ's scales, on the float model, for the Linear layers whose plan says ``method: awq``."""
    names = [n for n, m in student.named_modules() if n and isinstance(m, nn.Linear)]
    specs = {name: spec_from_plan(plan, recipe.calibration.activation_mode)
             for name, plan in recipe.resolve(names).items()
             if plan.method == "awq" and plan.w_bits not in (None, 16)}  # fmt: skip
    if not specs:
        return
    result, found = awq_(student, specs, _calibration(task, recipe), _runner(task, device))
    for norm, layers in result.groups.items():
        for name in layers:
            alpha, plain, best = found[name]
            out.rounding[name] = (
                f"awq α={alpha:g} through {norm}: sample output error {best:.2e} "
                f"(round-to-nearest {plain:.2e}, summed over the layers it feeds)"
            )
    out.skipped.update((f"{name}:method", reason) for name, reason in result.skipped.items())


def _gptq(student, layers, task, recipe, device, report: QuantReport) -> None:
    """GPTQ on the layers that ask for it; activation ranges measured again afterwards (the
    rounded weights change what later layers see)."""
    result = gptq_(student, layers, _calibration(task, recipe), _runner(task, device))
    for name, reason in result.skipped.items():
        report.skipped[f"{name}:method"] = reason
    report.rounding.update(result.notes())
    if any(spec.quantizes_input for spec in report.quantized.values()):
        _calibrate(student, task, recipe, device)


def _recalibrate(student: nn.Module, task: Task, recipe: Recipe, device) -> None:
    """Activation scales measured again after fine-tuning moved the weights (unless learned)."""
    if quant_modules(student) and not recipe.calibration.learnable_scales:
        _calibrate(student, task, recipe, device)


def deploy_snapshot(
    student: nn.Module, task: Task, recipe: Recipe, device: str | torch.device = "cpu"
) -> nn.Module:
    """The deploy form ``compress`` would return if fine-tuning stopped now — re-calibrated and
    deployed exactly as at the end — built from a copy, so training continues untouched.
    Successive halving judges trials at rungs on this form, as the search judges them at the end."""
    device = torch.device(device)
    snapshot = copy.deepcopy(student)
    _recalibrate(snapshot, task, recipe, device)
    example = move(task.calibration_batches(1)[0], device)
    deployed, _ = to_deploy(snapshot, device, lambda m: task.forward(m, example))
    return deployed


def _without_dropped(recipe: Recipe, dropped: list[str]) -> Recipe:
    """The recipe without keys for modules inside blocks that depth pruning removed."""
    if not dropped:
        return recipe
    gone = tuple(f"{block}." for block in dropped)
    layers = {k: p for k, p in recipe.layers.items() if k not in dropped and not k.startswith(gone)}
    return dataclasses.replace(recipe, layers=layers)


def _calibration(task, recipe):
    return task.calibration_batches(recipe.calibration.batches)


def _runner(task, device):
    return lambda model, batch: task.forward(model, move(batch, device))


def _calibrate(student, task, recipe, device) -> None:
    calibrate(
        student,
        _calibration(task, recipe),
        _runner(task, device),
        recipe.calibration.observer,
        recipe.calibration.percentile,
    )


def _wants_taylor(recipe: Recipe) -> bool:
    return recipe.prune.importance == "taylor" and any(
        p.keep_ratio is not None and p.keep_ratio < 1 for p in recipe.layers.values()
    )


def _taylor(student, task, cache, recipe, device):
    from compsearch.kernels.distill import output_loss

    def loss(model, index):
        batch, teacher = cache.get(index, device)
        outputs = task.forward(model, batch)
        supervised = task.task_loss(outputs, batch)
        return (
            supervised
            if supervised is not None
            else output_loss(outputs, teacher.outputs(), recipe.distill.temperature)
        )

    return taylor_gradients(student, loss, range(min(4, len(cache))))


def _last_heads(analysis: Analysis, record: PruneRecord) -> torch.Tensor | None:
    heads = [g for g in analysis.groups.values() if g.kind == "heads"]
    if not heads or heads[-1].name not in record.groups:
        return None
    group = heads[-1]
    kept = record.groups[group.name]["kept"]
    index = [u * group.q_per_kv + j for u in kept for j in range(group.q_per_kv)]
    return torch.tensor(index, dtype=torch.long)


def _merge(first: PruneReport, later: PruneReport) -> PruneReport:
    pruned = dict(first.pruned)
    for name, (kept, size) in later.pruned.items():
        pruned[name] = (kept, first.pruned[name][1] if name in first.pruned else size)
    return PruneReport(pruned, first.dropped_blocks + later.dropped_blocks,
                       {**first.skipped, **later.skipped}, {**first.untouched, **later.untouched},
                       {**first.blocked, **later.blocked})  # fmt: skip


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def _shifted(progress: StepCallback | None, offset: int) -> StepCallback | None:
    if progress is None:
        return None
    return lambda step, loss: progress(offset + step, loss)


def _check_feature_layers(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KernelError(
                f"distill.feature_layers: expected module names of the model, but it has no "
                f"{name!r} (after pruning, if blocks were dropped). Pick a layer that exists."
            )


def _check_cache(cache: TeacherCache | TeacherStream, recipe: Recipe, layers: list[str]) -> None:
    missing = [n for n in layers if n not in cache.spec.feature_layers]
    if missing or (recipe.distill.attn_weight > 0 and not cache.spec.attentions):
        raise KernelError(
            f"the teacher cache holds features {list(cache.spec.feature_layers)} and "
            f"{'' if cache.spec.attentions else 'no '}attention maps, but the recipe needs "
            f"{layers}{' and attention maps' if recipe.distill.attn_weight > 0 else ''}."
        )


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


# -- rebuilding a compressed model from an artifact -----------------------------------------------


def rebuild(
    task: Task, path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Recipe, DeployReport]:
    """The deploy form stored at ``path``: a fresh teacher, pruned by replaying the stored record,
    BatchNorm folded where the recipe quantized, then the packed weights loaded strictly."""
    from compsearch.kernels.deploy import build_deploy
    from compsearch.kernels.packing import read_packed
    from compsearch.recipes import loads

    packed, metadata = read_packed(path)
    if "compsearch.recipe" not in metadata:
        raise KernelError(
            f"{path}: expected the recipe in the artifact's metadata, but none is there."
        )
    recipe = loads(metadata["compsearch.recipe"], source=f"{path} (metadata)")
    record = PruneRecord.from_dict(
        json.loads(metadata.get("compsearch.prune_record", "{}") or "{}")
    )
    model = task.teacher()
    validate(recipe, model)
    example = task.calibration_batches(1)[0]

    def run(m):
        return task.forward(m, move(example, next(iter(m.parameters())).device))

    replay_(model, record, run)
    if packed.weights or packed.input_scales:
        fold_batchnorm_(
            model, run
        )  # compress folded before quantizing; the stored convs are folded
    deployed, report = build_deploy(model, packed, device, run)
    return deployed, recipe, report
