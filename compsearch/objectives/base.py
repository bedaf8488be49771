"""Objectives: named measurements with a direction and a unit, taken on the artifact that ships.

An :class:`Objective` measures a :class:`Candidate` — the deployed model, its artifact bytes and the
task — and returns ``{name: value}`` (its own value first, then anything it recorded on the way:
secondary metrics, spread). Proxies (MACs, BitOps) are objectives too, but flagged ``proxy`` and
never named latency.
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
    extra: dict[str, Any] = field(default_factory=dict)


class Objective(abc.ABC):
    """A measurement. Subclasses set ``name``, ``direction``, ``unit`` and implement ``measure``."""

    name: str
    direction: Literal["minimize", "maximize"]
    unit: str
    proxy: bool = False

    def prepare(self, reference: Candidate) -> None:  # noqa: B027 - an optional hook
        """Called once per study with the teacher's deploy form (to record reference values)."""

    @abc.abstractmethod
    def measure(self, candidate: Candidate) -> dict[str, float]:
        """``{self.name: value, ...}``: the objective's value and anything recorded with it."""

    def describe(self) -> str:
        label = " (proxy, not latency)" if self.proxy else ""
        return f"{self.name} [{self.unit}, {self.direction}]{label}"
