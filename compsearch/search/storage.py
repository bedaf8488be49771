"""Study storage: where trials live, how workers share them, and how dead workers are noticed.

* ``None`` (default): SQLite file ``study.db`` in the study folder — one machine, embedded.
* ``"journal"``: Optuna's ``JournalFileBackend`` at ``journal.log`` — several processes on one
  shared file system.
* a database URL: PostgreSQL / MySQL / SQLite via Optuna's RDB storage (heartbeats on), or
  ``redis://`` for a journal on Redis — a cluster.

Every worker holds an exclusive lock on ``workers/<id>.lock`` while it lives and tags the trials it
runs with its id; a RUNNING trial whose worker's lock is free belongs to a dead process on this
machine. For workers on other machines, every running trial refreshes a ``heartbeat`` attribute
(a UNIX time, any storage kind); a RUNNING trial whose heartbeat is older than the grace period
belongs to a dead worker wherever it ran (clocks of the machines are assumed to agree within the
grace period). On RDB storages Optuna's own heartbeat is on as well. Stale trials are failed and
their parameters enqueued again (``retry_of``), so a killed search resumes where it stopped.
Creating a trial under the trial budget happens under a study-wide lock (a lock file, or a
PostgreSQL advisory lock), so concurrent workers never overshoot the requested count.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compsearch.errors import StorageError

HEARTBEAT_S, GRACE_S = 10, 60
# heartbeats are what catches a dead worker on another machine; Optuna marks them experimental
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(setting: str | None, folder: Path) -> str:
    if setting is None:
        return f"sqlite:///{(folder / 'study.db').resolve()}"
    if setting == "journal":
        return f"journal://{(folder / 'journal.log').resolve()}"
    return setting


def open_storage(setting: str | None, folder: Path) -> optuna.storages.BaseStorage:
    """Open (and check that we can reach) the study's storage; a clear StorageError otherwise."""
    url = storage_url(setting, folder)
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal://") :]
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if url.startswith("redis://"):
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
        )
    except ImportError as error:
        missing = error.name or getattr(error.__cause__, "name", None) or "a database driver"
        raise StorageError(
            f"storage {_safe(url)!r}: expected its driver to be installed, but {missing!r} is "
            "missing. Install it with: pip install 'compsearch[cluster]'."
        ) from None
    except Exception as error:
        raise StorageError(
            f"storage {_safe(url)!r}: expected a reachable study storage, but opening it failed "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Check the URL, that the "
            "server runs and that this machine may connect to it."
        ) from None


def _safe(url: str) -> str:
    """The URL without a password."""
    return __import__("re").sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


# -- locks -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, folder: Path, study: str) -> Iterator[None]:
    """Mutual exclusion for everyone working on ``study``: a PostgreSQL advisory lock where the
    storage is PostgreSQL (workers on many machines), else a lock file in the study folder."""
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        key = int(hashlib.sha256(f"compsearch:{study}".encode()).hexdigest()[:15], 16)
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
        return
    with file_lock(folder / ".study.lock"):
        yield


class WorkerIdentity:
    """This process, as the trials it runs name it; alive while it holds its lock file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "workers"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._handle = open(self.folder / f"{self.id}.lock", "w")  # noqa: SIM115 - held for life
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            (self.folder / f"{self.id}.lock").unlink(missing_ok=True)
            self._handle = None

    def is_dead(self, worker: str) -> bool:
        """True when ``worker`` ran on this machine and no longer holds its lock."""
        if not worker or not worker.startswith(socket.gethostname() + "-") or worker == self.id:
            return False
        path = self.folder / f"{worker}.lock"
        if not path.exists():
            return True
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True


DIED = "its worker died"
HEARTBEAT_ATTR = "heartbeat"


def silent(trial, grace_s: float | None, now: float | None = None) -> bool:
    """A trial whose heartbeat stopped more than ``grace_s`` seconds ago."""
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if grace_s is None or beat is None:
        return False
    return (time.time() if now is None else now) - float(beat) > grace_s


def recover_stale(
    study: optuna.Study, me: WorkerIdentity, grace_s: float | None = None
) -> list[int]:
    """Fail RUNNING trials of dead workers and enqueue their parameters again. Returns their numbers.

    Dead: its worker's lock on this machine is free, or its heartbeat is older than ``grace_s``. A
    trial the search failed on purpose always carries a ``fail_reason``; a FAIL without one was
    failed by Optuna's heartbeat check, i.e. its worker died too.
    """
    with contextlib.suppress(NotImplementedError, AttributeError):
        optuna.storages.fail_stale_trials(study)  # heartbeat-based (RDB storages)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        if me.is_dead(worker) or (worker != me.id and silent(trial, grace_s)):
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", DIED)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    recovered = []
    for trial in trials:
        died = trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason", DIED) == DIED
        if died and trial.number not in retried:
            study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            recovered.append(trial.number)
    return recovered


def budget_count(study: optuna.Study) -> tuple[int, int]:
    """``(trials that count toward the requested number, trials waiting to run)``. Failed trials
    that were enqueued again do not count; their retries do."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    counted = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return len(counted), waiting


def budget_met(study: optuna.Study, trials: int) -> bool:
    """Whether ``trials`` trials have started (running or finished; a failed trial that is being
    retried is replaced by its retry). Waiting trials beyond the budget never start, so a budget
    below the number of enqueued baselines is still exact."""
    counted, waiting = budget_count(study)
    return counted - waiting >= trials
