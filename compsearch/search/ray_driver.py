"""The Ray Tune driver: the same search on a Ray cluster, writing to the same study.

Sampling is Ray's ``OptunaSearch`` pointed at the study's own storage and sampler, with the
objectives as its metric and mode lists; :class:`StudySearch` adds the study's trial budget (under
the study lock, like every Optuna worker) and keeps its state in the storage, so its pickle only
names the study. The Tune trainable calls the same trial function as the Optuna driver on the
Optuna trial the searcher created, so results, attributes and constraints land in the same study:
``status``, ``pareto``, ``export`` and ``train`` do not care which driver ran, and a study begun with
one driver continues with the other.

Every ``compsearch search`` starts a fresh Tune experiment on the study, with the settings of the
config as it is now (``trials``, ``time_limit``, ``max_concurrent``, ``cpus_per_trial`` …): the
study is the state, Tune's experiment is scratch (``runs/<study>/ray/<driver>``, removed when the
run ends). Trials a dead driver left running are failed and queued again, as the Optuna driver does,
and their retries continue from the dead trial's last checkpoint. A trial whose worker or node is
lost mid-run is restarted by Tune (``search.ray.max_retries`` times), on any node, from its own last
checkpoint in the shared runs root; each loss is recorded in the trial's ``retries`` attribute and
a trial that runs out of retries fails with the cause (it counts toward ``failure_limit``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from compsearch._steps import say
from compsearch.errors import ConfigError
from compsearch.search.driver import Driver, SearchSummary
from compsearch.search.prepare import (
    enqueue_baselines,
    enqueue_plans,
    prepare_study,
    study_sensitivity,
)
from compsearch.search.ray_cluster import check_nodes, connect
from compsearch.search.results import STUDY_ATTR
from compsearch.search.runner import (
    COMPLETE,
    checkpointing,
    execute,
    failure_stop,
    stop_reason,
    write_error,
)
from compsearch.search.samplers import make_sampler
from compsearch.search.storage import (
    DIED,
    WorkerIdentity,
    budget_met,
    open_storage,
    recover_stale,
    study_lock,
)
from compsearch.search.study import StudyFolder, open_study
from compsearch.search.trial import build_context

log = logging.getLogger(__name__)
TRIAL_ID, NUMBER = "compsearch_trial_id", "compsearch_trial_number"
RETRIES = "retries"


class StudySearch(OptunaSearch):
    """OptunaSearch on the study's storage and sampler, within the study's trial budget."""

    def __init__(self, folder: Path, driver: str) -> None:
        self._folder = Path(folder)
        self._driver = driver
        config = StudyFolder(self._folder).frozen()
        info = _study(self._folder).user_attrs[STUDY_ATTR]
        modes = ["max" if d == "maximize" else "min" for d in _directions(info)]
        super().__init__(
            space=self._define,
            metric=list(config.objectives),
            mode=modes,
            sampler=make_sampler(config),
            study_name=config.study,
            storage=open_storage(config.search.storage, self._folder),
        )
        self._space_cache = None

    def _define(self, trial) -> None:
        if self._space_cache is None:
            folder = StudyFolder(self._folder)
            info = _study(self._folder).user_attrs[STUDY_ATTR]
            self._space_cache = build_context(folder.frozen(), self._folder, info["teacher"]).space
        self._space_cache.suggest(trial)

    def suggest(self, trial_id: str):
        config = StudyFolder(self._folder).frozen()
        study = self._ot_study
        with study_lock(study._storage, self._folder, config.study):
            new = trial_id not in self._ot_trials
            if new and (budget_met(study, config.search.trials) or stop_reason(config, study)):
                return Searcher.FINISHED
            params = super().suggest(trial_id)
            trial = self._ot_trials[trial_id]
            trial.set_user_attr("worker", self._driver)
        return {**params, TRIAL_ID: trial._trial_id, NUMBER: trial.number}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        """The trainable told the study how its trial ended (the shared runner); a Tune trial that
        errored (its worker or node lost for good, or an error before the trial ran) is failed,
        with its cause, by :class:`TrialLog` right after this call. A trial that failed inside
        the trial function gets its one line here (the worker's own log stays on its node)."""
        self._completed_trials.add(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is None or error:
            return
        frozen = self._ot_study._storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.FAIL:
            reason = str(frozen.user_attrs.get("fail_reason", "unknown")).splitlines()[0][:300]
            log.warning("trial %d failed: %s (traceback in %s)", frozen.number, reason,
                        self._folder / "trials" / f"{frozen.number:05d}" / "error.txt")  # fmt: skip

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_space_cache"] = None
        state["_ot_study"] = None  # reopened from the storage the study names
        state["_storage"] = None
        state["_sampler"] = None
        state["_ot_trials"] = {k: t._trial_id for k, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state):
        trials = state.pop("_ot_trials")
        self.__dict__.update(state)
        config = StudyFolder(self._folder).frozen()
        self._storage = open_storage(config.search.storage, self._folder)
        self._sampler = make_sampler(config)
        self._ot_study = optuna.load_study(
            study_name=config.study, storage=self._storage, sampler=self._sampler
        )
        self._ot_trials = {k: optuna.trial.Trial(self._ot_study, i) for k, i in trials.items()}

    def save(self, checkpoint_path: str) -> None:
        """Tune's periodic searcher snapshot, as JSON (nothing is pickled; a run never restores
        it — the study is the state)."""
        state = {"ot_trials": {k: t._trial_id for k, t in self._ot_trials.items()}}
        Path(checkpoint_path).write_text(json.dumps(state))


class TrialLog(tune.Callback):
    """Records in the study what Tune knows about a lost or errored trial: each restart in the
    trial's ``retries`` attribute, a final error as its ``fail_reason`` (traceback in
    ``trials/<n>/error.txt``); one line on the log for each."""

    def __init__(self, folder: Path, max_retries: int) -> None:
        self.folder = Path(folder)
        self.max_retries = max_retries

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._record(trial, final=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._record(trial, final=True)

    def _record(self, tune_trial, final: bool) -> None:
        trial_id = tune_trial.config.get(TRIAL_ID)
        if trial_id is None:
            return
        study = _study(self.folder)
        frozen = study._storage.get_trial(trial_id)
        if frozen.state.is_finished():
            return
        cause = _cause(tune_trial)
        retries = list(frozen.user_attrs.get(RETRIES, []))
        number = frozen.number
        if not final:
            retries.append({"cause": cause, "node": frozen.user_attrs.get("node", "?"),
                            "at": time.time()})  # fmt: skip
            study._storage.set_trial_user_attr(trial_id, RETRIES, retries)
            log.warning("trial %d lost its run on %s (%s); retry %d of %d, from its last "
                        "checkpoint", number, retries[-1]["node"], cause, len(retries),
                        self.max_retries)  # fmt: skip
            return
        reason = cause + (f" (after {len(retries)} retries)" if retries else "")
        where = write_error(self.folder, number, _error_text(tune_trial) or reason)
        log.warning("trial %d failed: %s (traceback in %s)", number, reason[:300], where)
        study._storage.set_trial_user_attr(trial_id, "fail_reason", reason[:2000])
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _cause(tune_trial) -> str:
    """One line: what ended the Tune trial's last run, read from the text Tune writes next to the
    experiment (``error.txt``; its pickled twin is never loaded). A task error's text ends with
    the original exception's line; an actor's loss has no traceback, only its first line."""
    blocks = re.split(r"^Failure # \d+.*$", _error_text(tune_trial), flags=re.M)
    lines = [line.strip() for line in blocks[-1].splitlines() if line.strip()]
    if not lines:
        return "unknown error (Tune recorded none)"
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (raised[-1] if raised else lines[0])[:300]


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")


def _error_text(tune_trial) -> str:
    path = tune_trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return ""


def _directions(info: dict) -> list[str]:
    keys = info.get("keys", {})
    return [info["direction"] if o == "accuracy" else keys.get(o, (o, "minimize"))[1]
            for o in info["objectives"]]  # fmt: skip


def _study(folder: Path) -> optuna.Study:
    study_folder = StudyFolder(folder)
    return open_study(study_folder.frozen(), study_folder)


_CONTEXTS: dict[str, object] = {}


def trainable(config: dict, folder: str) -> None:
    """One Tune trial: the Optuna trial the searcher created, run by the shared trial function.
    A restart after a lost worker finds the trial still running and resumes it from the last
    checkpoint in its folder (the runs root is shared by every node)."""
    study_folder = StudyFolder(Path(folder))
    study_config = study_folder.frozen()
    study = _study(study_folder.path)
    if study._storage.get_trial(config[TRIAL_ID]).state != TrialState.RUNNING:
        return  # failed as stale meanwhile; its retry runs as a new trial
    node = ray.get_runtime_context().get_node_id()
    study._storage.set_trial_user_attr(config[TRIAL_ID], "node",
                                       f"{socket.gethostname()} ({node[:12]})")  # fmt: skip
    if folder not in _CONTEXTS:  # built once per worker process (actors are reused)
        info = study.user_attrs[STUDY_ATTR]
        _CONTEXTS[folder] = build_context(study_config, study_folder.path, info["teacher"])
    ctx = _CONTEXTS[folder]
    trial = optuna.trial.Trial(study, config[TRIAL_ID])
    outcome = execute(ctx, study, trial, checkpointing(ctx, trial))
    if outcome == COMPLETE:
        values = study._storage.get_trial(config[TRIAL_ID]).values
        tune.report(dict(zip(study_config.objectives, values, strict=True)))
    else:
        tune.report({"compsearch_state": outcome})


class RayDriver(Driver):
    name = "ray"

    def run(self) -> SearchSummary:
        settings = self.config.search.ray
        # the cluster first: a wrong address or a bad node fails in seconds, before the teacher
        say(connect(settings.address))
        problems = check_nodes(settings)
        if problems:
            raise ConfigError(
                f"the Ray cluster cannot run study {self.config.study!r} (nothing was queued or "
                "run):\n  " + "\n  ".join(problems)
            )
        ctx, study = prepare_study(self.config, self.folder)
        table = study_sensitivity(self.config, ctx, study)
        me = WorkerIdentity(self.folder.path)
        experiments = (self.folder.path / "ray").resolve()
        summary = SearchSummary(requested=self.config.search.trials)
        started = time.monotonic()
        try:
            with study_lock(study._storage, self.folder.path, self.config.study):
                _remove_dead_experiments(experiments, me)
                summary.recovered = recover_stale(study, me, self.config.search.heartbeat_grace)
                enqueue_baselines(self.config, ctx, study)
                enqueue_plans(self.config, ctx, study, table)
            trainer = tune.with_resources(
                tune.with_parameters(trainable, folder=str(self.folder.path.resolve())),
                {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
            )
            tuner = tune.Tuner(
                trainer,
                tune_config=tune.TuneConfig(
                    search_alg=StudySearch(self.folder.path.resolve(), me.id),
                    num_samples=-1,
                    max_concurrent_trials=settings.max_concurrent,
                    time_budget_s=self.config.search.time_limit,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=me.id, storage_path=str(experiments), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=settings.max_retries),
                    callbacks=[TrialLog(self.folder.path.resolve(), settings.max_retries)],
                ),
            )  # fmt: skip
            tuner.fit()
        finally:
            me.close()
            shutil.rmtree(experiments / me.id, ignore_errors=True)
        with study_lock(study._storage, self.folder.path, self.config.study):
            _fail_orphans(study, me)
        return _summarize(summary, self.config, study, me, started)


def _summarize(summary, config, study, me, started) -> SearchSummary:
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == me.id]
    summary.completed = sum(t.state == TrialState.COMPLETE for t in mine)
    summary.stopped = sum(t.state == TrialState.PRUNED for t in mine)
    summary.failed = sum(t.state == TrialState.FAIL for t in mine)
    summary.retried = sum(len(t.user_attrs.get(RETRIES, [])) for t in mine)
    if budget_met(study, config.search.trials):
        summary.reason = f"the study has its {config.search.trials} trials"
    else:
        summary.reason = stop_reason(config, study, started)
        summary.short = failure_stop(config, study) or not summary.reason
        if not summary.reason:
            summary.reason = ("the Ray experiment ended before the study had its "
                              f"{config.search.trials} trials; run the same command to go on")  # fmt: skip
    return summary


def _remove_dead_experiments(experiments: Path, me: WorkerIdentity) -> None:
    """Tune experiments of drivers on this machine that died (their trials are retried from the
    study; the experiment folder holds nothing more)."""
    if experiments.is_dir():
        for path in experiments.iterdir():
            if path.is_dir() and me.is_dead(path.name):
                shutil.rmtree(path, ignore_errors=True)


def _fail_orphans(study: optuna.Study, me: WorkerIdentity) -> None:
    """Trials this driver's searcher left RUNNING when Tune finished (none, normally): failed as
    DIED, so the next run retries them."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == me.id:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", DIED)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
