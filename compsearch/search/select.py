"""Choosing points of a study's feasible front to export as recipes.

Rules:

* ``best`` — the best value of one objective, subject to bounds on others
  (``best accuracy where latency_ms <= 5 and size_bytes <= 200KB``);
* ``knee`` — the front point closest to the ideal point (every objective at its best on the front),
  objectives scaled to [0, 1] over the front;
* ``diverse K`` — K points spread over the front: the best-accuracy point, then repeatedly the point
  farthest from those already chosen (scaled objectives).

A rule that no feasible point satisfies raises an error that shows the nearest points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compsearch.errors import ConfigError
from compsearch.objectives.constraints import parse_constraint
from compsearch.search.results import StudyResults, TrialRow

_BOUND = re.compile(r"\s*(\w+)\s*(<=|>=|<|>)\s*(.+?)\s*")


@dataclass(frozen=True)
class Bound:
    name: str
    op: str
    limit: float

    def holds(self, value: float) -> bool:
        return {"<=": value <= self.limit, "<": value < self.limit,
                ">=": value >= self.limit, ">": value > self.limit}[self.op]  # fmt: skip

    def miss(self, value: float) -> float:
        """How far ``value`` is from meeting the bound (0 if it does)."""
        return 0.0 if self.holds(value) else abs(value - self.limit)

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.limit:g}"


def parse_bound(text: str, metric: str, teacher: dict[str, float]) -> Bound:
    match = _BOUND.fullmatch(text)
    if not match:
        raise ConfigError(
            f"bound {text!r}: expected 'NAME OP VALUE' such as 'latency_ms <= 5', "
            "'size_bytes <= 200KB' or 'accuracy >= 0.95'."
        )
    name, op, value = match.groups()
    name = metric if name == "accuracy" else name
    if name in ("latency_ms", "size_bytes"):
        limit = parse_constraint(name, value, f"bound {text!r}").absolute(teacher)
    else:
        try:
            limit = float(value)
        except ValueError:
            raise ConfigError(
                f"bound {text!r}: expected a number after {op!r}, got {value!r}."
            ) from None
    return Bound(name, op, limit)


def _value(row: TrialRow, name: str) -> float:
    if name not in row.measured:
        raise ConfigError(
            f"expected a measured {name!r} on the study's trials, but trial {row.number} has only "
            f"{sorted(row.measured)}."
        )
    return row.measured[name]


def _better(results: StudyResults, name: str) -> int:
    """+1 if higher is better for ``name``, -1 if lower is."""
    return 1 if name == results.metric and results.direction == "maximize" else -1


def best(results: StudyResults, objective: str, bounds: list[Bound]) -> TrialRow:
    name = results.metric if objective == "accuracy" else objective
    front = results.front()
    if not front:
        raise ConfigError("the study has no feasible completed trial yet; run more trials first.")
    ok = [r for r in front if all(b.holds(_value(r, b.name)) for b in bounds)]
    if not ok:
        nearest = sorted(front, key=lambda r: sum(b.miss(_value(r, b.name)) /
                                                   max(abs(b.limit), 1e-12) for b in bounds))[:3]  # fmt: skip
        shown = "; ".join(
            f"trial {r.number}: " + ", ".join(f"{b.name}={_value(r, b.name):.4g}" for b in bounds)
            for r in nearest
        )
        raise ConfigError(
            f"no feasible front point has {' and '.join(map(str, bounds))}. Nearest: {shown}."
        )
    sign = _better(results, name)
    return max(ok, key=lambda r: sign * _value(r, name))


def _scaled(results: StudyResults, rows: list[TrialRow]) -> list[tuple[float, ...]]:
    points = [results.point(r) for r in rows]
    dims = len(points[0])
    lows = [min(p[i] for p in points) for i in range(dims)]
    highs = [max(p[i] for p in points) for i in range(dims)]
    return [
        tuple(
            (p[i] - lows[i]) / (highs[i] - lows[i]) if highs[i] > lows[i] else 0.0
            for i in range(dims)
        )
        for p in points
    ]


def knee(results: StudyResults) -> TrialRow:
    front = results.front()
    if not front:
        raise ConfigError("the study has no feasible completed trial yet; run more trials first.")
    scaled = _scaled(results, front)
    return front[min(range(len(front)), key=lambda i: math.dist(scaled[i], [0.0] * len(scaled[i])))]


def diverse(results: StudyResults, count: int) -> list[TrialRow]:
    front = results.front()
    if not front:
        raise ConfigError("the study has no feasible completed trial yet; run more trials first.")
    if count < 1:
        raise ConfigError(f"--diverse: expected a count of at least 1, but got {count}.")
    scaled = _scaled(results, front)
    accuracy = results.objectives.index("accuracy")  # wherever the config lists it
    chosen = [min(range(len(front)), key=lambda i: scaled[i][accuracy])]  # the most accurate first
    while len(chosen) < min(count, len(front)):
        rest = [i for i in range(len(front)) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(math.dist(scaled[i], scaled[j]) for j in chosen)))
    return [front[i] for i in chosen]
