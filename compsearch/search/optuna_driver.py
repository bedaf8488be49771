"""The Optuna driver: samplers, storage, baselines, the trial budget, and workers on one study.

``compsearch search CONFIG`` and ``compsearch worker runs/<study>`` both run :meth:`OptunaDriver.run`;
any number of them may share a study. Each new trial is created under the study lock only while
fewer trials than requested exist (failed-and-retried ones aside), so workers never overshoot.
"""

from __future__ import annotations

import logging
import time

import optuna

from compsearch.search.driver import Driver, SearchSummary
from compsearch.search.prepare import (
    attach_probe,
    enqueue_baselines,
    enqueue_plans,
    prepare_study,
    study_sensitivity,
)
from compsearch.search.progress import ProgressBar
from compsearch.search.results import load_results
from compsearch.search.runner import COMPLETE, PRUNED, execute, failure_stop, stop_reason
from compsearch.search.storage import (
    WorkerIdentity,
    budget_met,
    recover_stale,
    study_lock,
)

log = logging.getLogger(__name__)


class OptunaDriver(Driver):
    name = "optuna"

    def run(self) -> SearchSummary:
        ctx, study = prepare_study(self.config, self.folder)
        table = study_sensitivity(self.config, ctx, study)
        attach_probe(self.config, ctx, study)
        me = WorkerIdentity(self.folder.path)
        summary = SearchSummary(requested=self.config.search.trials)
        started = time.monotonic()
        progress = ProgressBar(self.config.search.trials, self.config.study)
        try:
            with study_lock(study._storage, self.folder.path, self.config.study):
                summary.recovered = recover_stale(study, me, self.config.search.heartbeat_grace)
                enqueue_baselines(self.config, ctx, study)
                enqueue_plans(self.config, ctx, study, table)
            progress.update(load_results(study))
            while True:
                reason = stop_reason(self.config, study, started)
                if reason:
                    summary.reason = reason
                    summary.short = failure_stop(self.config, study)
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
