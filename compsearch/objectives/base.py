"""Objectives: named measurements with a direction and a unit, taken on the artifact that ships.

An :class:`Objective` measures a :class:`Candidate` — the deployed model, its artifact bytes and the
task — and returns ``{name: value}`` (its own value first, then anything it recorded on the way:
secondary metrics, spread). Proxies (MACs, BitOps) are objectives too, but flagged ``proxy`` and
never named latency.

Lifecycle: ``build(setup)`` once per study (or final run) → ``prepare(reference)`` with the teacher's
deploy form, or ``use_reference(reference)`` and ``restore(values)`` with the teacher values a study
recorded → ``measure(candidate)``
per trial: at the trial's structure (its architecture and formats final) or, for objectives with
``after_training``, on the trained deploy form. Built-ins and ``module:Class`` plug-ins are found by
:func:`compsearch.objectives.registry.objective_class`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from compsearch.tasks.base import Task


@dataclass
class Candidate:
    """What is measured: the deploy form, its artifact, and what the search knows about it."""

    task: Task
    deployed: nn.Module
    artifact: bytes
    student: nn.Module | None = None  # the fake-quant model (for proxies counted on its structure)
    quant_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: what the search knows beyond the model: ``trial`` (its number) and ``latency_checks`` (the
    #: study's latency-table check errors) — see compsearch.objectives.lut
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MeasureSetup:
    """What building an objective may need: the task, the device, and the latency settings."""

    task: Task
    device: str = "cpu"
    threads: int | None = 2
    warmup: int = 3
    repeats: int = 20
    table: Any = None  # a LatencyTable, in table mode
    #: measured latency: repeats go on until the median ratio's 95 % interval is within this
    #: (relative), up to ``max_repeats``; a teacher reference moved more than ``latency_drift``
    #: re-measures the trial (see compsearch.objectives.latency)
    latency_ci: float = 0.05
    max_repeats: int = 60
    latency_drift: float = 0.25
    split: str = "validation"
    #: what latency is timed in: ``torch`` (the deploy form in PyTorch) or ``onnxruntime`` (the
    #: deploy form exported to ONNX, in an ONNX Runtime session)
    runtime: str = "torch"


class Objective(abc.ABC):
    """A measurement. Subclasses set ``name``, ``direction``, ``unit`` and implement ``measure``."""

    name: str
    direction: Literal["minimize", "maximize"]
    unit: str
    proxy: bool = False
    #: measured on the trained deploy form (accuracy), not as soon as the structure is final
    after_training: bool = False

    @classmethod
    def build(cls, setup: MeasureSetup) -> Objective:
        """The objective for a study or final run; override where the constructor needs more."""
        return cls()

    def prepare(self, reference: Candidate) -> None:  # noqa: B027 - an optional hook
        """Called once per study with the teacher's deploy form (to record reference values)."""

    def use_reference(self, reference: Candidate) -> None:  # noqa: B027 - an optional hook
        """Called in every process that measures — the one that starts a study and every worker
        that joins it — with the teacher's deploy form (latency times it alongside candidates)."""

    def restore(self, teacher: dict[str, float]) -> None:  # noqa: B027 - an optional hook
        """Take the reference values a study recorded instead of measuring the teacher again."""

    @abc.abstractmethod
    def measure(self, candidate: Candidate) -> dict[str, float]:
        """``{self.name: value, ...}``: the objective's value and anything recorded with it."""

    def describe(self) -> str:
        label = " (proxy, not latency)" if self.proxy else ""
        return f"{self.name} [{self.unit}, {self.direction}]{label}"
