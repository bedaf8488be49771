"""The Ray Tune driver: the same search on a Ray cluster, writing to the same study.

Sampling is Ray's ``OptunaSearch`` pointed at the study's own storage and sampler, with the
objectives as its metric and mode lists; :class:`StudySearch` adds the study's trial budget (under
the study lock, like every Optuna worker) and keeps its state in the storage, so its pickle only
names the study. The Tune trainable calls the same trial function as the Optuna driver on the
Optuna trial the searcher created, so results, attributes and constraints land in the same study:
``status``, ``pareto``, ``export`` and ``train`` do not care which driver ran, and a study begun with
one driver continues with the other.

Fine-tuning checkpoints are reported to Tune; ``compsearch search`` on an interrupted Ray study
restores the experiment (``Tuner.restore``) and its searcher and resumes interrupted trials from
their last checkpoint. A Ray experiment that exists but cannot be restored is an error — never a
silent fresh start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from compsearch.errors import StorageError
from compsearch.paths import runs_root
from compsearch.search.driver import Driver, SearchSummary
from compsearch.search.prepare import (
    enqueue_baselines,
    enqueue_plans,
    prepare_study,
    study_sensitivity,
)
from compsearch.search.results import STUDY_ATTR, load_results
from compsearch.search.runner import (
    COMPLETE,
    checkpointing,
    checkpoints_of,
    execute,
    saved_step,
    stop_reason,
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
EXPERIMENT = "tune"
TRIAL_ID, NUMBER = "compsearch_trial_id", "compsearch_trial_number"


class StudySearch(OptunaSearch):
    """OptunaSearch on the study's storage and sampler, within the study's trial budget."""

    def __init__(self, folder: Path) -> None:
        self._folder = Path(folder)
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
            trial.set_user_attr("worker", _driver_id(self._folder))
        return {**params, TRIAL_ID: trial._trial_id, NUMBER: trial.number}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        """The trainable told the study how its trial ended (the shared runner); only a trial
        that never got that far (its actor died) is told here, as failed."""
        trial = self._ot_trials.get(trial_id)
        if (
            trial is not None
            and self._ot_study._storage.get_trial(trial._trial_id).state.is_finished()
        ):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, None, error=True)

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
        """The searcher's own state as JSON: which Tune trial is which study trial, and which are
        done. Everything else is the study's, reopened from its storage; no file is unpickled."""
        state = {
            "ot_trials": {k: t._trial_id for k, t in self._ot_trials.items()},
            "completed": sorted(self._completed_trials),
        }
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        try:
            state = json.loads(Path(checkpoint_path).read_text())
            trials, completed = state["ot_trials"], state["completed"]
        except (OSError, ValueError, KeyError, TypeError):
            raise StorageError(
                f"the Ray searcher state at {checkpoint_path}: expected the JSON an earlier run of "
                "this compsearch wrote, but it is not (an older compsearch pickled it). Move the "
                "study's ray/ folder aside to start the Ray search afresh on the same study."
            ) from None
        self._ot_trials = {k: optuna.trial.Trial(self._ot_study, int(i)) for k, i in trials.items()}
        self._completed_trials = set(completed)


def _driver_id(folder: Path) -> str:
    """The live driver's worker id (a restored searcher outlives the driver that pickled it)."""
    return (folder / "ray" / "driver.id").read_text().strip()


def _directions(info: dict) -> list[str]:
    keys = info.get("keys", {})
    return [info["direction"] if o == "accuracy" else keys.get(o, (o, "minimize"))[1]
            for o in info["objectives"]]  # fmt: skip


def _study(folder: Path) -> optuna.Study:
    study_folder = StudyFolder(folder)
    return open_study(study_folder.frozen(), study_folder)


_CONTEXTS: dict[str, object] = {}


def trainable(config: dict, folder: str) -> None:
    """One Tune trial: the Optuna trial the searcher created, run by the shared trial function."""
    study_folder = StudyFolder(Path(folder))
    study_config = study_folder.frozen()
    study = _study(study_folder.path)
    if folder not in _CONTEXTS:  # built once per worker process (actors are reused)
        info = study.user_attrs[STUDY_ATTR]
        _CONTEXTS[folder] = build_context(study_config, study_folder.path, info["teacher"])
    ctx = _CONTEXTS[folder]
    trial = optuna.trial.Trial(study, config[TRIAL_ID])
    if study._storage.get_trial(config[TRIAL_ID]).state != TrialState.RUNNING:
        return  # failed as stale while the experiment was down; its retry runs as a new trial
    root = checkpoints_of(ctx, config[NUMBER])
    # resume from the newer of the trial's own saves (the runs root is shared by every node) and
    # the checkpoint Tune restored: Tune records checkpoints in its experiment state only every
    # few seconds, so after a kill the trial's own files are often ahead of Tune's copy
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            if saved_step(Path(directory)) > saved_step(root):
                shutil.rmtree(root, ignore_errors=True)
                shutil.copytree(directory, root)

    def hand_to_tune(directory: Path, step: int) -> None:
        tune.report({"fine_tune_step": step}, checkpoint=tune.Checkpoint.from_directory(str(root)))

    checkpoint = checkpointing(ctx, trial, hand_to_tune)
    outcome = execute(ctx, study, trial, checkpoint)
    if outcome == COMPLETE:
        values = study._storage.get_trial(config[TRIAL_ID]).values
        tune.report(dict(zip(study_config.objectives, values, strict=True)))
    else:
        tune.report({"compsearch_state": outcome})


class RayDriver(Driver):
    name = "ray"

    def run(self) -> SearchSummary:
        ctx, study = prepare_study(self.config, self.folder)
        table = study_sensitivity(self.config, ctx, study)
        me = WorkerIdentity(self.folder.path)
        experiment = (self.folder.path / "ray").resolve()
        settings = self.config.search.ray
        try:
            experiment.mkdir(parents=True, exist_ok=True)
            (experiment / "driver.id").write_text(me.id + "\n")
            with study_lock(study._storage, self.folder.path, self.config.study):
                restoring = (experiment / EXPERIMENT).exists()
                if restoring:
                    _adopt(study, me)  # the restored experiment resumes these trials
                else:
                    recover_stale(study, me, self.config.search.heartbeat_grace)
                enqueue_baselines(self.config, ctx, study)
                enqueue_plans(self.config, ctx, study, table)
            # checkpoint reports during fine-tuning carry no objective values yet (and a stopped
            # trial none at all); the multi-objective searcher reads only the final report
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
            self._init(settings.address)
            trainer = tune.with_resources(
                tune.with_parameters(trainable, folder=str(self.folder.path.resolve())),
                {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
            )
            if restoring:
                if not tune.Tuner.can_restore(str(experiment / EXPERIMENT)):
                    raise StorageError(
                        f"the Ray experiment at {experiment / EXPERIMENT} cannot be restored. "
                        "Move it aside to start the Ray search afresh on the same study."
                    )
                tuner = tune.Tuner.restore(str(experiment / EXPERIMENT), trainer,
                                           resume_unfinished=True, resume_errored=False)  # fmt: skip
            else:
                tuner = tune.Tuner(
                    trainer,
                    tune_config=tune.TuneConfig(
                        search_alg=StudySearch(self.folder.path.resolve()),
                        num_samples=-1,
                        max_concurrent_trials=settings.max_concurrent,
                        time_budget_s=self.config.search.time_limit,
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=EXPERIMENT, storage_path=str(experiment.resolve()), verbose=0,
                    ),
                )  # fmt: skip
            tuner.fit()
        finally:
            me.close()
        with study_lock(study._storage, self.folder.path, self.config.study):
            _fail_orphans(study, me)
        results = load_results(study)
        counts = results.counts()
        return SearchSummary(
            counts.get("COMPLETE", 0), counts.get("PRUNED", 0), counts.get("FAIL", 0),
            reason="the Ray experiment finished",
        )  # fmt: skip

    def _init(self, address: str) -> None:
        """Start or join Ray. Every node must see the runs root at the same path (shared storage)."""
        if ray.is_initialized():
            return
        env = {"env_vars": {"COMPSEARCH_RUNS": str(runs_root().resolve())}}
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=env)


def _adopt(study: optuna.Study, me: WorkerIdentity) -> None:
    """RUNNING trials of dead workers become this driver's: the restored experiment resumes them;
    any it does not are failed (and retried) when it finishes."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if me.is_dead(trial.user_attrs.get("worker", "")):
            study._storage.set_trial_user_attr(trial._trial_id, "worker", me.id)


def _fail_orphans(study: optuna.Study, me: WorkerIdentity) -> None:
    """Trials this driver's searcher left RUNNING when Tune finished (none, normally)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == me.id:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", DIED)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
