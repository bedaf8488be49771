"""The trial function every driver calls: recipe → compress → measure → values and constraints.

:func:`build_context` does the per-study work once (task, space, teacher reference measurements,
teacher cache); :func:`run_trial` is one trial. Latency and size are measured on the deploy form as
soon as the architecture is final (they do not depend on the trained weights), accuracy on the
deploy form after fine-tuning. With successive halving, accuracy is also measured at each rung, on
the deploy form the trial would ship if it stopped there (:func:`compsearch.pipeline.deploy_snapshot`).

Screening (``search.screen``, on by default): a candidate whose latency or size — known once the
structure is final — already breaks a hard bound is not fine-tuned. It is told to the study as
COMPLETE with its measured latency and size and its *zero-shot* accuracy (the deploy form before any
fine-tuning), its constraints set (so it is infeasible and never on a front), ``steps`` 0 and the
user attribute ``screened`` naming the broken bounds: samplers learn from it at a small fraction of
a trained trial's cost. Size (exact) is measured before latency, and the latency of a candidate
that is screened either way stops early: at the sixth pair where size already breaks its bound, and
as soon as its interval lies wholly past the latency bound (``latency_settled``).
How a trial ends (complete, stopped, failed) is recorded by :mod:`compsearch.search.runner`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compsearch._files import write_text_atomic
from compsearch._steps import say
from compsearch.errors import ConfigError, TrialError
from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.packing import export_packed, packed_to_bytes
from compsearch.kernels.quant import quant_bits
from compsearch.objectives import (
    Candidate,
    LatencyObjective,
    LatencyTable,
    MeasureSetup,
    Objective,
    float_artifact,
)
from compsearch.objectives.registry import build_objectives
from compsearch.paths import runs_root
from compsearch.pipeline import compress, deploy_snapshot
from compsearch.recipes import dumps
from compsearch.search.config import StudyConfig
from compsearch.search.halving import Rungs, Stopped, promotable
from compsearch.search.pareto import dominates, normalize
from compsearch.spaces import Space, discover
from compsearch.tasks import Task, get_task, move
from compsearch.tasks.teacher_outputs import CacheSpec, TeacherCache
from compsearch.train import Checkpointing

log = logging.getLogger(__name__)
LATENCY = LatencyObjective.name
CONSTRAINTS_ATTR = "constraints"  # optuna.study._constrained_optimization's key
MODEL_FILE = "model.safetensors"  # a trained trial's artifact, with search.save_models
RungRecords = Callable[[int], dict[int, tuple[tuple[float, ...], float]]]
LatencyChecks = Callable[[], list[float]]
#: what the study's completed, trained, feasible trials measured (the front's members among them)
Feasible = Callable[[], list[dict]]


@dataclass
class SearchContext:
    config: StudyConfig
    folder: Path
    task: Task
    space: Space
    objectives: dict[str, Objective]  # by config name; the core set and the config's own
    cache: TeacherCache
    teacher: dict[str, float]  # the teacher's values of every objective
    rungs: Rungs | None
    device: torch.device
    example: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, model: nn.Module):
        return self.task.forward(model, self.example)

    @property
    def metric(self) -> str:
        return self.task.primary_metric

    @property
    def accuracy(self) -> Objective:
        return self.objectives["accuracy"]

    @property
    def directions(self) -> list[str]:
        return [self.objectives[name].direction for name in self.config.objectives]

    def values(self, measured: dict[str, float]) -> tuple[float, ...]:
        return tuple(measured[self.objectives[name].name] for name in self.config.objectives)

    def point(self, measured: dict[str, float]) -> tuple[float, ...]:
        return normalize(measured, self.config.objectives, self.metric, self.task.direction,
                         self.teacher, self.keys)  # fmt: skip

    @property
    def keys(self) -> dict[str, tuple[str, str]]:
        """Every cost objective's measured key and direction (see search.pareto.normalize)."""
        return {name: (o.name, o.direction) for name, o in self.objectives.items()
                if name != "accuracy"}  # fmt: skip

    def violations(self, measured: dict[str, float]) -> dict[str, float]:
        return {c.name: c.value(measured, self.metric) for c in self.config.constraints}

    def cost_violations(self, measured: dict[str, float]) -> dict[str, float]:
        """The bounds training cannot change (every constraint but the accuracy drop)."""
        return {c.name: c.value(measured, self.metric) for c in self.config.constraints
                if c.name != "accuracy_drop"}  # fmt: skip

    def screen_above(self, measured: dict[str, float]) -> tuple[float, bool] | None:
        """For a trial that will be screened if it breaks a cost bound: the latency bound
        ``(limit, relative)`` its measurement may stop at once clearly past (see
        :meth:`LatencyObjective.measure_interleaved`) — ``(0, …)`` where a cost already measured
        (size, exact) breaks its own bound; None without screening, or neither."""
        if not self.config.search.screen:
            return None
        bound = None
        for constraint in self.config.constraints:
            if constraint.name == LATENCY:
                bound = constraint
            elif constraint.name != "accuracy_drop":
                try:
                    if constraint.value(measured, self.metric) > 0:
                        return 0.0, True
                except KeyError:  # measured after the latency
                    continue
        return None if bound is None else (bound.limit, bound.relative)


class Screened(Exception):
    """The candidate breaks a hard latency or size bound: it is not fine-tuned."""

    def __init__(self, broken: dict[str, float]) -> None:
        self.broken = broken
        super().__init__(
            ", ".join(f"{name} over by {excess:.4g}" for name, excess in broken.items())
        )


def build_context(
    config: StudyConfig, folder: Path, teacher_values: dict[str, float] | None = None
) -> SearchContext:
    """Everything a study needs once: the task, its space, and the teacher measured as a reference.

    A worker joining a study passes the ``teacher_values`` the study recorded, so every worker
    normalizes against the same reference (and does not spend time measuring it again).
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: expected a CUDA device for 'cuda', but torch sees none.")
    task = get_task(config.task, runs_root=runs_root())
    teacher = task.teacher()
    info = discover(task, teacher)
    space = Space.build(config.space, info, task.name, config.device,
                        config.search.finetune_steps, config.study,
                        config.latency.runtime)  # fmt: skip
    example = task.calibration_batches(1)[0]
    teacher.to(device)
    shipped, _ = to_deploy(teacher, device, lambda m: task.forward(m, move(example, device)))
    reference = Candidate(task, shipped, float_artifact(teacher), teacher)
    table = None
    if config.latency.mode == "table":
        key = f"{config.device}-{torch.__version__}-{config.latency.threads}t".replace("+", "_")
        settings = config.latency
        table = LatencyTable(runs_root() / "_latency" / f"{key}.json", config.device,
                             settings.threads, settings.table_bound, settings.check_first,
                             settings.check_every)  # fmt: skip
    settings = config.latency
    setup = MeasureSetup(task, config.device, settings.threads, settings.warmup, settings.repeats,
                         table, latency_ci=settings.ci, max_repeats=settings.max_repeats,
                         latency_drift=settings.drift, runtime=settings.runtime)  # fmt: skip
    objectives = build_objectives(config.objectives, setup)
    if teacher_values is None:
        say(f"measuring the {task.name} teacher's deploy form (the study's reference)")
        values: dict[str, float | str] = {}
        for objective in objectives.values():
            objective.prepare(reference)
            values.update(objective.measure(reference))
        values = {k: float(v) for k, v in values.items() if not isinstance(v, str)}
    else:
        values = dict(teacher_values)
        for objective in objectives.values():
            objective.use_reference(reference)
            objective.restore(values)
        if table is not None:
            table.calibrate(shipped, task, values["latency_ms"])
    batch_size = task.default_batch_size
    cache = TeacherCache(
        task,
        CacheSpec(
            batches=config.search.cache_batches,
            batch_size=batch_size,
            feature_layers=tuple(task.default_feature_layers(teacher))
            if config.space.feature_weight.high > 0
            else (),
            attentions=config.space.attn_weight.high > 0,
        ),
        folder / "cache",
        device,
    )
    halving = config.search.halving
    rungs = None
    if halving.enabled and config.search.finetune_steps > 0:
        rungs = Rungs.plan(config.search.finetune_steps, halving.eta, halving.min_steps)
    return SearchContext(config, folder, task, space, objectives, cache, values, rungs, device,
                         move(example, device))  # fmt: skip


def run_trial(
    ctx: SearchContext,
    trial,
    rung_records: RungRecords | None = None,
    checkpoint: Checkpointing | None = None,
    latency_checks: LatencyChecks | None = None,
    feasible: Feasible | None = None,
) -> tuple[float, ...]:
    """One trial. Raises :class:`Stopped` when halving stops it (its values stay in its attributes);
    with ``checkpoint``, its fine-tuning saves (and, with ``resume``, continues from) checkpoints.
    ``latency_checks`` returns the study's latency-table check errors so far (table mode);
    ``feasible``, what its feasible trials measured (a predicted latency joining their front is
    measured, see :func:`_confirm_latency`)."""
    started = time.perf_counter()
    recipe = ctx.space.suggest(trial)
    trial_dir = ctx.folder / "trials" / f"{trial.number:05d}"
    write_text_atomic(trial_dir / "recipe.yaml", dumps(recipe))
    measured: dict[str, float | str] = {}
    student_ref: dict[str, nn.Module] = {}

    def on_structure(student: nn.Module, metadata: dict[str, str]) -> None:
        t0 = time.perf_counter()
        student_ref["model"] = student
        extra = {"trial": trial.number, "screen": True,
                 "latency_checks": latency_checks() if latency_checks is not None else []}  # fmt: skip
        candidate = measure_structure(ctx, student, metadata, measured, extra)
        if ctx.config.search.sampler == "surrogate":  # what the surrogate sampler learns from
            measured["zero_shot_loss"] = zero_shot_loss(ctx, candidate.deployed,
                                                        ctx.config.search.sensitivity_batches)  # fmt: skip
        ctx.timings["measure"] = ctx.timings.get("measure", 0.0) + time.perf_counter() - t0
        broken = {k: v for k, v in ctx.cost_violations(measured).items() if v > 0}
        if broken and ctx.config.search.screen:
            measured.update(_after_training(ctx, candidate))  # zero-shot: before any fine-tune
            raise Screened(broken)

    quarter = max(1, recipe.finetune.steps // 4)

    def progress(step: int, loss: float) -> None:
        if ctx.rungs is None or rung_records is None:
            if step % quarter == 0:  # no rungs: the fine-tune's loss at each quarter
                report_intermediate(trial, step, loss)
            return
        rung = ctx.rungs.index(step)
        if rung is None:
            return
        shipped = deploy_snapshot(student_ref["model"], ctx.task, recipe, ctx.device)
        at_rung = {**measured, **_after_training(ctx, Candidate(ctx.task, shipped, b""))}
        point = ctx.point(at_rung)
        # only what training cannot change decides feasibility at a rung: latency and size are
        # final, accuracy is still rising
        violation = sum(max(0.0, v) for v in ctx.cost_violations(at_rung).values())
        trial.set_user_attr(f"rung_{rung}", {"step": step, "point": list(point),
                                             "violation": violation})  # fmt: skip
        report_intermediate(trial, step, float(at_rung[ctx.metric]))
        records = rung_records(rung)
        records[trial.number] = (point, violation)
        if not promotable(trial.number, records, ctx.rungs.eta):
            _record(trial, ctx, at_rung, step)
            raise Stopped(rung, step)

    try:
        result = compress(ctx.task, recipe, device=ctx.device, cache=ctx.cache, progress=progress,
                          checkpoint=checkpoint, on_structure=on_structure)  # fmt: skip
    except Screened as screened:
        trial.set_user_attr("screened", str(screened))
        timings = {"measure": ctx.timings.pop("measure", 0.0)}
        return _finish(ctx, trial, measured, 0, {"timings": timings, "screened": str(screened),
                                                 "seconds": time.perf_counter() - started})  # fmt: skip
    evaluated = time.perf_counter()
    measured.update(_after_training(ctx, Candidate(ctx.task, result.deployed, b"")))
    measured["float_share"] = result.quant_report.float_share  # of the weights, kept in float
    if feasible is not None:
        _confirm_latency(ctx, measured, result.deployed, feasible)
    if ctx.config.search.save_models:
        result.save(trial_dir / MODEL_FILE)
    timings = {**result.timings, "measure": ctx.timings.pop("measure", 0.0),
               "evaluate": time.perf_counter() - evaluated}  # fmt: skip
    return _finish(ctx, trial, measured, result.train.steps, {
        "timings": timings, "seconds": time.perf_counter() - started,
        "kernels": result.deploy_report.kernels,
        "skipped": {**result.quant_report.skipped, **result.prune_report.skipped},
        "float_weights": result.quant_report.left_float,
        "unpruned": {**result.prune_report.blocked, **result.prune_report.untouched},
        "rounding": {**result.quant_report.rounding, **result.quant_report.smoothed},
    })  # fmt: skip


def _confirm_latency(ctx: SearchContext, measured: dict, deployed: nn.Module,
                     feasible: Feasible) -> None:  # fmt: skip
    """A feasible trial whose latency is the latency table's prediction and that no feasible
    trial dominates is measured end to end before it is recorded: the front holds measurements,
    predictions only rank the trials behind it. (On minilm the table predicted a copy of the int8
    baseline, changed in a layer the task never runs, 13-27 % under the baseline's measurement,
    so the copy looked faster than the deploy form it equalled.)"""
    objective = ctx.objectives.get(LATENCY)
    if measured.get("latency_source") != "predicted" or objective is None:
        return
    if _violation(ctx, measured) > 0:
        return
    point = ctx.point(measured)
    if any(dominates(ctx.point(other), point) for other in feasible()):
        return
    measured.pop("latency_table_error", None)
    measured.update(objective.confirm(deployed, ctx.task, float(measured[objective.name])))


def _finish(ctx: SearchContext, trial, measured: dict[str, float | str], steps: int,
            details: dict) -> tuple[float, ...]:  # fmt: skip
    """Record a trial's measurements and constraints, write its metrics.json, return its values."""
    values = ctx.values(measured)
    for name, value in zip(ctx.config.objectives, values, strict=True):
        if not math.isfinite(value):
            raise TrialError(f"objective {name} is {value} (not a finite number)")
    _record(trial, ctx, measured, steps)
    store_constraints(trial, list(ctx.violations(measured).values()))
    trial_dir = ctx.folder / "trials" / f"{trial.number:05d}"
    write_text_atomic(trial_dir / "metrics.json", json.dumps({
        "values": dict(zip(ctx.config.objectives, values, strict=True)),
        "measured": measured, **details,
    }, indent=2, sort_keys=True))  # fmt: skip
    return values


def measure_structure(ctx: SearchContext, student: nn.Module, metadata: dict[str, str],
                      measured: dict[str, float | str], extra: dict) -> Candidate:  # fmt: skip
    """Measure into ``measured`` what the final structure and formats decide (latency, size, …)
    on the deploy form and the exact artifact bytes; returns the candidate measured."""
    deployed, _ = to_deploy(student, ctx.device, ctx.run)
    artifact = packed_to_bytes(export_packed(student), metadata)  # the file's exact bytes
    candidate = Candidate(ctx.task, deployed, artifact, student, quant_bits(student), extra)
    pending = [o for o in ctx.objectives.values() if not o.after_training]
    for objective in sorted(pending, key=lambda o: o.name == LATENCY):  # exact costs first
        if objective.name == LATENCY and extra.get("screen"):
            candidate.extra["latency_above"] = ctx.screen_above(measured)
        measured.update(objective.measure(candidate))
    return candidate


def zero_shot_loss(ctx: SearchContext, deployed: nn.Module, batches: int) -> float:
    """The output distillation loss (temperature 1) of ``deployed`` against the teacher's outputs,
    averaged over the first ``batches`` batches of the study's teacher cache (training data)."""
    from compsearch.kernels.distill import output_loss

    losses = []
    with torch.no_grad():
        for index in range(min(batches, len(ctx.cache))):
            batch, teacher = ctx.cache.get(index, ctx.device)
            outputs = ctx.task.forward(deployed, batch)
            losses.append(float(output_loss(outputs, teacher.outputs(), 1.0)))
    return sum(losses) / len(losses)


def _after_training(ctx: SearchContext, candidate: Candidate) -> dict[str, float | str]:
    measured: dict[str, float | str] = {}
    for objective in ctx.objectives.values():
        if objective.after_training:
            measured.update(objective.measure(candidate))
    return measured


def store_constraints(trial, values: list[float]) -> None:
    """The constraint values (``≤ 0`` feasible), in the config's order, where both Optuna's
    samplers and optuna-dashboard read them: the trial's ``constraints`` system attribute, as a
    list — Optuna's own ``constraints_func`` form. (``Trial.set_constraint``'s named keys are read
    by Optuna 5 but not by optuna-dashboard, which then shows infeasible trials as feasible.) Their
    names, in the same order, are the ``compsearch`` study attribute's ``constraint_names``."""
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR,
                                        [float(v) for v in values])  # fmt: skip


def report_intermediate(trial, step: int, value: float) -> None:
    """An intermediate value Optuna's tools plot. ``Trial.report`` refuses multi-objective
    studies (it serves pruners, which they cannot use); the storage keeps the value all the same."""
    if math.isfinite(value) and step not in trial._cached_frozen_trial.intermediate_values:
        trial.storage.set_trial_intermediate_value(trial._trial_id, step, float(value))
        trial._cached_frozen_trial.intermediate_values[step] = float(value)


def _record(trial, ctx: SearchContext, measured: dict[str, float | str], steps: int) -> None:
    trial.set_user_attr("measured", {k: v if isinstance(v, str) else float(v)
                                     for k, v in measured.items()})  # fmt: skip
    trial.set_user_attr("steps", steps)
    trial.set_user_attr("violation", _violation(ctx, measured))
    # concise, flat attributes for Optuna's own tools (optuna-dashboard's trial table)
    trial.set_user_attr("recipe", f"trials/{trial.number:05d}/recipe.yaml")
    for key in (f"{ctx.metric}_drop_rel", "speedup", "size_ratio", "latency_ci"):
        if isinstance(measured.get(key), (int, float)):
            trial.set_user_attr(key, round(float(measured[key]), 4))


def _violation(ctx: SearchContext, measured: dict[str, float | str]) -> float:
    return sum(max(0.0, v) for v in ctx.violations(measured).values())
