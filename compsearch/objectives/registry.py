"""Objectives by name: the built-ins, or a user's own ``module.path:Class``.

A study config lists objectives by these names (``accuracy`` is the task's primary metric); the
trial, the final report and ``pareto`` all find them here, so a new objective is one new file: an
:class:`~compsearch.objectives.base.Objective` subclass with ``name``, ``direction``, ``unit`` and
``measure``. A plug-in is imported only because the user's own config names it.
"""

from __future__ import annotations

from compsearch._plugins import import_target
from compsearch.errors import ConfigError
from compsearch.objectives.accuracy import AccuracyObjective
from compsearch.objectives.base import MeasureSetup, Objective
from compsearch.objectives.latency import LatencyObjective
from compsearch.objectives.proxies import BitOpsObjective, MacsObjective
from compsearch.objectives.size import SizeObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "accuracy": AccuracyObjective,
    "latency_ms": LatencyObjective,
    "size_bytes": SizeObjective,
    "macs": MacsObjective,
    "bitops": BitOpsObjective,
}
#: measured in every study whatever it optimizes: constraints and reports read them
ALWAYS = ("accuracy", "latency_ms", "size_bytes", "macs")


def is_plugin(name: str) -> bool:
    module, _, attribute = name.partition(":")
    return bool(module and attribute)


def objective_class(name: str) -> type[Objective]:
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if not is_plugin(name):
        raise ConfigError(
            f"objective: expected one of {', '.join(OBJECTIVES)} or 'module.path:Class', but got "
            f"{name!r}."
        )
    found = import_target(name, "objectives", ConfigError)
    if not (isinstance(found, type) and issubclass(found, Objective)):
        raise ConfigError(
            f"objective {name!r}: expected a compsearch.objectives.Objective subclass, but got "
            f"{found!r}."
        )
    return found


def build_objectives(names, setup: MeasureSetup) -> dict[str, Objective]:
    """``{config name: objective}`` for ``names`` and the ones every study measures."""
    wanted = dict.fromkeys([*ALWAYS, *names])
    return {name: objective_class(name).build(setup) for name in wanted}
