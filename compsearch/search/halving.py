"""Multi-objective successive halving over the fine-tune budget (asynchronous rungs).

Optuna's pruners do not support multi-objective studies and Ray's schedulers take one metric, so
this is ours. Rungs are at ``min_steps · eta^k`` fine-tune steps (below the full budget; see
:meth:`Rungs.plan` for the default first rung). When a
trial reaches a rung it records its objective point there (accuracy as trained so far; latency
and size are final once the architecture is) in the study storage, and continues only if it is in
the top ``1/eta`` of all trials that reached that rung — feasible ones (of the budgets training cannot
change: latency and size) first, by non-dominated rank and crowding among themselves, then
infeasible ones by violation (see :func:`promotable`). With fewer than ``eta`` trials at a rung, the
best one continues. Accuracy at a rung is measured on the deploy form the trial would ship if it
stopped there.
A stopped trial keeps its rung and values (trial attributes) and is left out of the final front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from compsearch.search.pareto import crowding, ranks


class Stopped(Exception):
    """Raised inside a trial that successive halving stops at a rung."""

    def __init__(self, rung: int, step: int) -> None:
        super().__init__(f"stopped by successive halving at rung {rung} (step {step})")
        self.rung, self.step = rung, step


@dataclass(frozen=True)
class Rungs:
    steps: tuple[int, ...]
    eta: int

    @classmethod
    def plan(cls, total: int, eta: int, min_steps: int = 0) -> Rungs:
        """Rungs below ``total`` steps. The default first rung is ``total / eta²``, or ``total /
        eta`` when that would be under 32 steps: in the first few dozen steps of a fine-tune
        (warm-up included) accuracy says little about where the trial will end."""
        first = min_steps or total // (eta * eta)
        if not min_steps and first < 32:
            first = max(1, total // eta)
        steps = []
        step = first
        while step < total:
            steps.append(step)
            step *= eta
        return cls(tuple(steps), eta)

    def index(self, step: int) -> int | None:
        return self.steps.index(step) if step in self.steps else None


def promotable(me: int, records: dict[int, tuple[Sequence[float], float]], eta: int) -> bool:
    """Does trial ``me`` continue? ``records`` maps every trial that reached this rung (``me``
    included) to its point (minimized) and constraint violation (> 0: infeasible).

    Constrained domination (Deb's rule): every feasible trial ranks before every infeasible one;
    feasible trials are ordered by non-dominated rank and crowding computed among feasible trials
    only, so an infeasible point never demotes a feasible one; infeasible trials by violation."""
    numbers = sorted(records)
    feasible = [n for n in numbers if records[n][1] <= 0]
    infeasible = [n for n in numbers if records[n][1] > 0]
    points = [tuple(records[n][0]) for n in feasible]
    rank, distance = ranks(points), crowding(points)
    ordered = [feasible[i] for i in sorted(range(len(feasible)),
                                           key=lambda i: (rank[i], -distance[i], feasible[i]))]  # fmt: skip
    ordered += sorted(infeasible, key=lambda n: (records[n][1], n))
    keep = max(1, len(numbers) // eta)
    return ordered.index(me) < keep


def rung_records(study) -> Callable[[int], dict[int, tuple[tuple[float, ...], float]]]:
    """Reads, from the study storage, every trial's point and violation at a rung."""

    def records(rung: int) -> dict[int, tuple[tuple[float, ...], float]]:
        key = f"rung_{rung}"
        return {
            t.number: (tuple(t.user_attrs[key]["point"]), t.user_attrs[key]["violation"])
            for t in study.get_trials(deepcopy=False)
            if key in t.user_attrs
        }

    return records
