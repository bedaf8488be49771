"""Running one trial and recording how it ended: the code both drivers share.

:func:`execute` runs the trial function on an Optuna trial and tells the study how it ended:

* COMPLETE with its values (and constraints, set by the trial function);
* PRUNED when successive halving stopped it — its rung values stay in its attributes;
* FAIL with ``fail_reason`` = the exception's type and message, for *any* exception from the task,
  the kernels or the measurements, and for an objective that is NaN or infinite. Such a trial
  counts toward ``failure_limit`` and is never retried;
* FAIL with ``fail_reason`` = :data:`~compsearch.search.storage.DIED` on ``KeyboardInterrupt``
  (the process is going away): such a trial is retried when the study resumes.

:func:`stop_reason` is the rule both drivers stop on; failures are counted over the whole study, so
``failure_limit`` means the same under either driver and across resumes.
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from compsearch.search.config import StudyConfig
from compsearch.search.halving import Stopped, rung_records
from compsearch.search.storage import DIED
from compsearch.search.trial import SearchContext, run_trial
from compsearch.train import Checkpointing

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
        with get_heartbeat_thread(trial._trial_id, study._storage):  # no-op without heartbeats
            values = run_trial(ctx, trial, rung_records(study), checkpoint,
                               lambda: latency_checks(study))  # fmt: skip
    except Stopped as stop:
        trial.set_user_attr("stopped", str(stop))
        study.tell(trial, state=TrialState.PRUNED)
        return PRUNED
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", DIED)  # retried when the study resumes
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        log.warning("trial %d failed: %s", trial.number, reason.splitlines()[0][:500])
        trial.set_user_attr("fail_reason", reason[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return FAILED
    study.tell(trial, values)
    return COMPLETE


def failures(study: optuna.Study) -> int:
    """Trials of the study that failed for a reason of their own (not a dead worker)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("fail_reason") not in (None, DIED)
    )


def latency_checks(study: optuna.Study) -> list[float]:
    """Relative errors of every latency-table check the study recorded (table mode)."""
    errors = []
    for trial in study.get_trials(deepcopy=False):
        error = trial.user_attrs.get("measured", {}).get("latency_check_error")
        if error is not None:
            errors.append(float(error))
    return errors


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
