"""Preparing a study for trials — the one place both drivers (and benchmarks) do it.

:func:`prepare_study` checks the storage, builds the trial context (task, space, teacher reference,
teacher cache), and only then writes the study folder and its attributes; :func:`enqueue_baselines`
queues the uniform baselines once, never past the trial budget; :func:`study_sensitivity` measures
(or reads back) the study's sensitivity table where the plans or the sampler use it, and
:func:`enqueue_plans` queues the one-shot ILP recipes after the baselines, within the same budget.
"""

from __future__ import annotations

import optuna

from compsearch._files import remove_stale_temporaries
from compsearch.search.config import StudyConfig
from compsearch.search.plan import ladder
from compsearch.search.preflight import preflight
from compsearch.search.results import STUDY_ATTR
from compsearch.search.sensitivity import (
    COSTS,
    Sensitivity,
    load_or_measure,
    probe,
    reference_params,
    untrained_costs,
)
from compsearch.search.storage import open_storage
from compsearch.search.study import StudyFolder, open_study
from compsearch.search.trial import SearchContext, build_context

#: uniform recipes a search starts from: (label, format on the menu, keep ratio)
BASELINES = (("int8", "w8a8", 1.0), ("4-bit", "w4", 1.0), ("keep 0.5 + int8", "w8a8", 0.5))


def prepare_study(config: StudyConfig, folder: StudyFolder) -> tuple[SearchContext, optuna.Study]:
    """Check the storage, build everything the trials need, then (and only then) write the study
    folder — a bad storage URL fails in a second and leaves nothing behind. A study that exists
    already lends its recorded teacher values: every worker judges trials against the same
    reference, and none spends time measuring the teacher again."""
    if config.search.storage not in (None, "journal"):  # a server: reachable first
        open_storage(config.search.storage, folder.path)
    recorded = recorded_teacher(config, folder)
    ctx = build_context(config, folder.path, recorded)
    if recorded is None and config.search.preflight:  # a new study: its bounds are reachable
        preflight(config, ctx)
    folder.path.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.path)  # what writers killed mid-write left behind
    study = open_study(config, folder, ctx.directions)
    folder.freeze(config)
    if not study.metric_names:  # what Optuna's tools label the objectives with
        study.set_metric_names([ctx.metric if n == "accuracy" else n for n in config.objectives])
    if STUDY_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR, {
            "objectives": list(config.objectives), "metric": ctx.metric,
            "direction": ctx.task.direction, "teacher": ctx.teacher, "task": ctx.task.name,
            "constraints": [c.describe() for c in config.constraints],
            "constraint_names": [c.name for c in config.constraints],
            "latency_setup": latency_setup(config, ctx),
            "intermediate_values": (f"{ctx.metric} at each rung" if ctx.rungs else
                                    "fine-tune loss at each quarter of the budget"),
            "keys": {n: list(k) for n, k in ctx.keys.items() if n in config.objectives},
        })  # fmt: skip
    return ctx, study


def latency_setup(config: StudyConfig, ctx: SearchContext) -> str:
    """What a latency of this study measures, in words: device, threads, batch, runtime."""
    example = ctx.task.example_inputs()
    sizes = [t.shape[0] for t in example.values() if getattr(t, "ndim", 0)]
    batch = f"batch {sizes[0]}, " if sizes else ""
    if config.device == "cuda":
        return f"{batch}CUDA, PyTorch, CUDA graph"
    return f"{batch}{config.latency.threads} CPU threads, PyTorch eager"


def recorded_teacher(config: StudyConfig, folder: StudyFolder) -> dict[str, float] | None:
    """The teacher values the study recorded when it started, or None for a new study."""
    if not folder.exists():
        return None
    try:
        study = open_study(config, folder)
    except KeyError:  # the folder exists, the study in its storage does not (yet)
        return None
    return study.user_attrs.get(STUDY_ATTR, {}).get("teacher")


def enqueue_baselines(config: StudyConfig, ctx: SearchContext, study: optuna.Study) -> None:
    """Queue the uniform baselines once per study, at most as many as the trial budget."""
    if not config.search.baselines or study.user_attrs.get("baselines_enqueued"):
        return
    for label, fmt, keep in BASELINES[: config.search.trials]:
        study.enqueue_trial(ctx.space.uniform_params(fmt, keep), user_attrs={"baseline": label})
    study.set_user_attr("baselines_enqueued", True)


def study_sensitivity(config: StudyConfig, ctx: SearchContext, study: optuna.Study
                      ) -> Sensitivity | None:  # fmt: skip
    """The study's sensitivity table where the plans or the surrogate sampler need one."""
    wanted = config.search.plans > 0 or config.search.sampler == "surrogate"
    if not wanted or not ctx.space.dimensions:
        return None
    return load_or_measure(ctx, study, config.search.sensitivity_batches)


def enqueue_plans(config: StudyConfig, ctx: SearchContext, study: optuna.Study,
                  table: Sensitivity | None) -> None:  # fmt: skip
    """Queue the one-shot ILP recipes once per study: ``search.plans`` of them, but at most a
    quarter of the trial budget (the sampler keeps most of it) and what the baselines left."""
    if table is None or not config.search.plans or study.user_attrs.get("plans_enqueued"):
        return
    limits = {c.name: c.absolute(ctx.teacher) for c in config.constraints if c.name in COSTS}
    room = config.search.trials - len(study.get_trials(deepcopy=False))  # baselines included
    reference = reference_params(ctx.space)
    count = min(config.search.plans, max(1, config.search.trials // 4), max(0, room))
    said: list[str] = []

    def log(line: str) -> None:
        print(line)
        said.append(line)

    plans = (
        ladder(table, limits, count, lambda p: untrained_costs(ctx, p), log=log) if count else []
    )
    for plan in plans:
        study.enqueue_trial({**reference, **plan.params}, user_attrs={"plan": plan.describe()})
    if said:  # kept with the study: which rungs were left out or kept over their aim, and why
        study.set_user_attr("plans_log", said)
    study.set_user_attr("plans_enqueued", True)


def attach_probe(config: StudyConfig, ctx: SearchContext, study: optuna.Study) -> None:
    """Let the surrogate sampler measure its most promising candidates untrained, in this
    process (the one that runs the trials, so on the trials' device)."""
    attach = getattr(study.sampler, "attach", None)
    if attach is not None and config.search.sampler == "surrogate":
        batches = config.search.sensitivity_batches
        attach(lambda params: probe(ctx, params, batches))
