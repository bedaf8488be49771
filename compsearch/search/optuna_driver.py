"""The Optuna driver: samplers, storage, baselines, the trial budget, and workers on one study.

``compsearch search CONFIG`` and ``compsearch worker runs/<study>`` both run :meth:`OptunaDriver.run`;
any number of them may share a study. Each new trial is created under the study lock only while
fewer trials than requested exist (failed-and-retried ones aside), so workers never overshoot.
"""

from __future__ import annotations

import logging
import time

import optuna

from compsearch._files import remove_stale_temporaries
from compsearch.errors import ConfigError
from compsearch.search.config import StudyConfig
from compsearch.search.driver import Driver, SearchSummary
from compsearch.search.progress import Progress
from compsearch.search.results import STUDY_ATTR, load_results
from compsearch.search.runner import COMPLETE, PRUNED, execute, stop_reason
from compsearch.search.storage import (
    WorkerIdentity,
    budget_met,
    open_storage,
    recover_stale,
    study_lock,
)
from compsearch.search.trial import SearchContext, build_context

log = logging.getLogger(__name__)
BASELINES = (("int8", "w8a8", 1.0), ("4-bit", "w4", 1.0), ("keep 0.5 + int8", "w8a8", 0.5))


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    seed = config.search.seed
    name = config.search.sampler
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=config.search.population_size, seed=seed
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(config: StudyConfig, folder, ctx: SearchContext | None = None) -> optuna.Study:
    storage = open_storage(config.search.storage, folder.path)
    directions = ctx.directions if ctx else None
    if directions is None:
        return optuna.load_study(study_name=config.study, storage=storage)
    study = optuna.create_study(
        study_name=config.study,
        storage=storage,
        directions=directions,
        sampler=make_sampler(config),
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(
            f"study {config.study!r}: the storage holds it with directions {stored}, but the config "
            f"gives {directions}. Use another study name."
        )
    return study


class OptunaDriver(Driver):
    name = "optuna"

    def prepare(self) -> tuple[SearchContext, optuna.Study]:
        """Check the storage, build everything the trials need, then (and only then) write the
        study folder — a bad storage URL fails in a second and leaves nothing behind. A study
        that exists already lends its recorded teacher values: every worker judges trials against
        the same reference, and none spends time measuring the teacher again."""
        if self.config.search.storage not in (None, "journal"):  # a server: reachable first
            open_storage(self.config.search.storage, self.folder.path)
        ctx = build_context(self.config, self.folder.path, self.recorded_teacher())
        self.folder.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder.path)  # what writers killed mid-write left behind
        study = open_study(self.config, self.folder, ctx)
        self.folder.freeze(self.config)
        if STUDY_ATTR not in study.user_attrs:
            study.set_user_attr(STUDY_ATTR, {
                "objectives": list(self.config.objectives), "metric": ctx.metric,
                "direction": ctx.task.direction, "teacher": ctx.teacher, "task": ctx.task.name,
                "constraints": [c.describe() for c in self.config.constraints],
            })  # fmt: skip
        return ctx, study

    def recorded_teacher(self) -> dict[str, float] | None:
        """The teacher values the study recorded when it started, or None for a new study."""
        if not self.folder.exists():
            return None
        try:
            study = open_study(self.config, self.folder)
        except KeyError:  # the folder exists, the study in its storage does not (yet)
            return None
        return study.user_attrs.get(STUDY_ATTR, {}).get("teacher")

    def enqueue_baselines(self, ctx: SearchContext, study: optuna.Study) -> None:
        if not self.config.search.baselines or study.user_attrs.get("baselines_enqueued"):
            return
        for label, fmt, keep in BASELINES[: self.config.search.trials]:  # never past the budget
            study.enqueue_trial(ctx.space.uniform_params(fmt, keep), user_attrs={"baseline": label})
        study.set_user_attr("baselines_enqueued", True)

    def run(self) -> SearchSummary:
        ctx, study = self.prepare()
        me = WorkerIdentity(self.folder.path)
        summary = SearchSummary()
        started = time.monotonic()
        progress = Progress(self.config.search.trials, self.config.study)
        try:
            with study_lock(study._storage, self.folder.path, self.config.study):
                summary.recovered = recover_stale(study, me, self.config.search.heartbeat_grace)
                self.enqueue_baselines(ctx, study)
            progress.update(load_results(study))
            while True:
                reason = stop_reason(self.config, study, started)
                if reason:
                    summary.reason = reason
                    break
                trial = self.next_trial(study, me)
                if trial is None:
                    summary.reason = f"the study has its {self.config.search.trials} trials"
                    break
                outcome = execute(ctx, study, trial)
                if outcome == COMPLETE:
                    summary.completed += 1
                elif outcome == PRUNED:
                    summary.stopped += 1
                else:
                    summary.failed += 1
                progress.update(load_results(study))
        finally:
            progress.close()
            me.close()
        return summary

    def next_trial(self, study: optuna.Study, me: WorkerIdentity):
        with study_lock(study._storage, self.folder.path, self.config.study):
            recover_stale(study, me, self.config.search.heartbeat_grace)
            if budget_met(study, self.config.search.trials):
                return None
            trial = study.ask()
            trial.set_user_attr("worker", me.id)
            return trial
