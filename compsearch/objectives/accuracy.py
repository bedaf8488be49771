"""Accuracy: the task's primary metric, measured on the deploy form, and the drop vs the teacher."""

from __future__ import annotations

from compsearch.objectives.base import Candidate, Objective


class AccuracyObjective(Objective):
    """The task's primary metric; records every metric the task reports and the drop vs the teacher
    (``<metric>_drop``: how much worse, in the metric's units; ``<metric>_drop_rel``: as a fraction
    of the teacher's value). Positive drop means worse, whichever way the metric points.

    ``split`` is the held-out part it measures on: ``validation`` for everything the search decides,
    ``test`` for the final report only (see :mod:`compsearch.tasks.base`)."""

    unit = "metric"
    after_training = True

    @classmethod
    def build(cls, setup) -> AccuracyObjective:
        return cls(setup.task.primary_metric, setup.task.direction, setup.split)

    def restore(self, teacher: dict[str, float]) -> None:
        self.teacher = {k: v for k, v in teacher.items() if not k.startswith(("size", "latency"))}

    def __init__(self, metric: str, direction: str, split: str = "validation") -> None:
        self.name = metric
        self.direction = direction
        self.split = split
        self.teacher: dict[str, float] = {}

    def prepare(self, reference: Candidate) -> None:
        self.teacher = reference.task.evaluate(reference.deployed, self.split)

    def measure(self, candidate: Candidate) -> dict[str, float]:
        metrics = candidate.task.evaluate(candidate.deployed, self.split)
        value = metrics[self.name]
        out = {self.name: value}
        out.update({k: v for k, v in metrics.items() if k != self.name})
        if self.teacher:
            base = self.teacher[self.name]
            drop = base - value if self.direction == "maximize" else value - base
            out[f"{self.name}_teacher"] = base
            out[f"{self.name}_drop"] = drop
            out[f"{self.name}_drop_rel"] = drop / abs(base) if base else 0.0
        return out
