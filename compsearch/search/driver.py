"""Drivers run a study's trials; each is loaded by name, so importing compsearch never imports Ray.

Lifecycle: ``Driver(config, folder)`` → ``run()`` (prepares the study context, runs trials until the
budget is met, returns a :class:`SearchSummary`). Every driver calls the same trial function
(:func:`compsearch.search.trial.run_trial`) and writes to the same study storage, so ``status``,
``pareto``, ``export`` and ``train`` do not care which driver ran — and a study begun with one can
be continued with another.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field

from compsearch.errors import ConfigError
from compsearch.search.config import StudyConfig
from compsearch.search.study import StudyFolder

DRIVERS = {
    "optuna": ("compsearch.search.optuna_driver", "OptunaDriver", None),
    "ray": ("compsearch.search.ray_driver", "RayDriver", "ray"),
}


@dataclass
class SearchSummary:
    """What one ``run()`` did. ``completed``, ``stopped``, ``failed`` and ``retried`` count this
    run's trials (``retried``: restarts after a lost worker or node, each resumed from its last
    checkpoint); ``recovered`` are trials of dead workers enqueued again; ``short`` is True when
    the search ended before the study had its ``requested`` trials for a reason the user did not
    set as an end (failures, a lost cluster) — the command line then exits 1."""

    completed: int = 0
    stopped: int = 0
    failed: int = 0
    recovered: list[int] = field(default_factory=list)
    reason: str = ""
    requested: int = 0
    retried: int = 0
    short: bool = False

    def counts(self) -> str:
        return (f"trials requested {self.requested}; this run: {self.completed} completed, "
                f"{self.stopped} stopped, {self.failed} failed, {self.retried} retried after a "
                "lost worker")  # fmt: skip


class Driver(abc.ABC):
    name: str

    def __init__(self, config: StudyConfig, folder: StudyFolder) -> None:
        self.config = config
        self.folder = folder

    @abc.abstractmethod
    def run(self) -> SearchSummary:
        """Run trials until the study's budget is met; resumable at any point."""


def load_driver(name: str) -> type[Driver]:
    """A built-in driver by name, or a plug-in ``module.path:Class`` (a :class:`Driver` subclass;
    it prepares its study with :func:`compsearch.search.prepare.prepare_study` and runs trials with
    :func:`compsearch.search.runner.execute`, like the built-ins)."""
    if name in DRIVERS:
        module_name, attribute, extra = DRIVERS[name]
    elif ":" in name:
        (module_name, _, attribute), extra = name.partition(":"), None
    else:
        raise ConfigError(
            f"driver: expected one of {', '.join(DRIVERS)} or 'module.path:Class', but got {name!r}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if extra and error.name and error.name.split(".")[0] == extra:
            raise ConfigError(
                f"driver {name!r}: expected the {extra!r} package, but it is not installed. "
                f"Install the extra with: pip install 'compsearch[{extra}]'."
            ) from None
        if extra:
            raise
        raise ConfigError(f"driver {name!r}: expected an importable module ({error}).") from None
    driver = getattr(module, attribute, None)
    if not (isinstance(driver, type) and issubclass(driver, Driver)):
        raise ConfigError(
            f"driver {name!r}: expected a compsearch.search.Driver subclass, but got {driver!r}."
        )
    return driver
