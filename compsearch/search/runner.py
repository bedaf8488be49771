"""Running one trial and recording how it ended: the code both drivers share.

:func:`execute` runs the trial function on an Optuna trial and tells the study how it ended:

* COMPLETE with its values (and constraints, set by the trial function);
* PRUNED when successive halving stopped it — its rung values stay in its attributes;
* FAIL with ``fail_reason`` = the exception's type and message, for *any* exception from the task,
  the kernels or the measurements, and for an objective that is NaN or infinite. Such a trial
  counts toward ``failure_limit`` and is never retried;
* FAIL with ``fail_reason`` = :data:`~compsearch.search.storage.DIED` on ``KeyboardInterrupt``
  (the process is going away): such a trial is retried when the study resumes.

While it runs, a trial saves fine-tuning checkpoints in its folder (every quarter of the budget)
and refreshes a ``heartbeat`` timestamp in the study, whatever the storage. A worker that dies —
here or on another machine — leaves a RUNNING trial whose heartbeat stops; any live worker fails
it after ``search.heartbeat_grace`` seconds and enqueues a retry, and the retry continues from the
dead trial's last checkpoint (same parameters, same data order), recording ``resumed_from_step``.
A finished trial's checkpoints are deleted: they exist only to resume.

:func:`stop_reason` is the rule both drivers stop on; failures are counted over the whole study, so
``failure_limit`` means the same under either driver and across resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from compsearch.search.config import StudyConfig
from compsearch.search.halving import Stopped, rung_records
from compsearch.search.storage import DIED, HEARTBEAT_ATTR
from compsearch.search.trial import SearchContext, run_trial
from compsearch.train import META_FILE, Checkpointing

log = logging.getLogger(__name__)
COMPLETE, PRUNED, FAILED = "COMPLETE", "PRUNED", "FAIL"


def execute(
    ctx: SearchContext,
    study: optuna.Study,
    trial: optuna.trial.Trial,
    checkpoint: Checkpointing | None = None,
) -> str:
    """Run ``trial`` and tell ``study`` how it ended; returns COMPLETE, PRUNED or FAIL."""
    try:
        if checkpoint is None:
            checkpoint = checkpointing(ctx, trial)
        with get_heartbeat_thread(trial._trial_id, study._storage), Heartbeat(study, trial, ctx):
            values = run_trial(ctx, trial, rung_records(study), checkpoint,
                               lambda: latency_checks(study), lambda: feasible_measured(study))  # fmt: skip
    except Stopped as stop:
        trial.set_user_attr("stopped", str(stop))
        study.tell(trial, state=TrialState.PRUNED)
        outcome = PRUNED
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", DIED)  # retried (from its checkpoint) on resume
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        where = write_error(ctx.folder, trial.number, traceback.format_exc())
        log.warning("trial %d failed: %s (traceback in %s)", trial.number,
                    reason.splitlines()[0][:300], where)  # fmt: skip
        trial.set_user_attr("fail_reason", reason[:2000])
        study.tell(trial, state=TrialState.FAIL)
        outcome = FAILED
    else:
        study.tell(trial, values)
        outcome = COMPLETE
    if checkpoint is not None:
        shutil.rmtree(checkpoint.directory, ignore_errors=True)
    return outcome


def write_error(folder: Path, number: int, text: str) -> Path:
    """The full traceback of a failed trial, kept in its folder (the study keeps one line)."""
    path = folder / "trials" / f"{number:05d}" / "error.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:  # the reason is still stored in the study
        log.warning("traceback of trial %d not written: %s", number, error)
    return path


def checkpoints_of(ctx: SearchContext, number: int) -> Path:
    return ctx.folder / "trials" / f"{number:05d}" / "checkpoints"


def saved_step(root: Path) -> int:
    """The last fine-tuning step saved under ``root`` (0 when none)."""
    steps = [json.loads(p.read_text())["step"] for p in root.glob(f"stage-*/{META_FILE}")]
    return max(steps, default=0)


def checkpointing(
    ctx: SearchContext,
    trial: optuna.trial.Trial,
    on_save: Callable[[Path, int], None] | None = None,
) -> Checkpointing:
    """Checkpoints in the trial's folder; a retry of a dead trial starts from the dead one's."""
    root = checkpoints_of(ctx, trial.number)
    dead = trial.user_attrs.get("retry_of")
    if dead is not None:
        source = checkpoints_of(ctx, int(dead))
        if saved_step(source) > saved_step(root):
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(source, root)
    resume_step = saved_step(root)
    if resume_step:
        trial.set_user_attr("resumed_from_step", resume_step)
    every = max(1, ctx.config.search.finetune_steps // 4)
    return Checkpointing(root, every, resume_step > 0, on_save)


class Heartbeat:
    """Refreshes the trial's ``heartbeat`` attribute (a UNIX time) while the block runs."""

    def __init__(self, study: optuna.Study, trial: optuna.trial.Trial, ctx: SearchContext) -> None:
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.interval = max(1.0, min(30.0, ctx.config.search.heartbeat_grace / 4))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="compsearch-heartbeat")

    def _beat(self) -> None:
        while True:
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception as error:  # a storage hiccup must not kill the trial
                log.warning("heartbeat of trial id %d not written: %s", self.trial_id, error)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def failures(study: optuna.Study) -> int:
    """Trials of the study that failed for a reason of their own (not a dead worker)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("fail_reason") not in (None, DIED)
    )


def failure_stop(config: StudyConfig, study: optuna.Study) -> bool:
    """Whether the study is at its failure limit (the search ends short of its trials)."""
    return failures(study) >= config.search.failure_limit


def latency_checks(study: optuna.Study) -> list[float]:
    """Relative errors of every latency-table check the study recorded (table mode)."""
    errors = []
    for trial in study.get_trials(deepcopy=False):
        error = trial.user_attrs.get("measured", {}).get("latency_check_error")
        if error is not None:
            errors.append(float(error))
    return errors


def feasible_measured(study: optuna.Study) -> list[dict]:
    """What the study's completed, trained trials within every bound measured."""
    return [t.user_attrs["measured"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("measured") and not t.user_attrs.get("screened")
            and t.user_attrs.get("violation", 0.0) <= 0]  # fmt: skip


def stop_reason(config: StudyConfig, study: optuna.Study, started: float | None = None) -> str:
    """Why the search stops now, or "" to go on: time limit (of this invocation, when ``started``
    is given), failure limit, fine-tune step budget."""
    search = config.search
    if (
        started is not None
        and search.time_limit
        and time.monotonic() - started >= search.time_limit
    ):
        return f"the time limit ({search.time_limit:g} s) is reached"
    failed = failures(study)
    if failed >= search.failure_limit:
        return (
            f"{failed} trials failed (failure_limit {search.failure_limit}); see "
            "'compsearch status' for the reasons"
        )
    if search.step_budget:
        used = sum(t.user_attrs.get("steps", 0) for t in study.get_trials(deepcopy=False))
        if used >= search.step_budget:
            return f"the fine-tune step budget ({search.step_budget}) is spent"
    return ""
