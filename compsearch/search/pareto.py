"""Pareto fronts and hypervolume, on objectives turned into "lower is better" and normalized.

Normalization makes objectives comparable and the hypervolume meaningful across studies: accuracy
becomes its relative drop vs the teacher, latency, size and MACs their ratio to the teacher's; so
the teacher itself sits at (0, 1, 1). The fixed reference point is 1.0 for the accuracy drop (all
accuracy lost) and 1.1 for the cost ratios — a point more than 10 % slower or larger than the
teacher adds no volume; the 10 % absorbs timer noise on models compression barely speeds up.
Latency's ratio is the one measured interleaved with the teacher (``1 / speedup``, see
compsearch.objectives.latency) where the trial has it: trials measured minutes apart, under a
different load, stay comparable, where their absolute times would not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, ...]
ACCURACY_REFERENCE, COST_REFERENCE = 1.0, 1.1


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse everywhere and better somewhere (all objectives minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting: 0 for the front, 1 for the front without it, and so on."""
    remaining = list(range(len(points)))
    rank = [0] * len(points)
    level = 0
    while remaining:
        front = [remaining[i] for i in non_dominated([points[j] for j in remaining])]
        for index in front:
            rank[index] = level
        remaining = [i for i in remaining if i not in front]
        level += 1
    return rank


def crowding(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance (larger = more isolated, boundary points infinite)."""
    count = len(points)
    if count <= 2:
        return [float("inf")] * count
    distance = [0.0] * count
    for m in range(len(points[0])):
        order = sorted(range(count), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = float("inf")
        if high == low:
            continue
        for k in range(1, count - 1):
            distance[order[k]] += (points[order[k + 1]][m] - points[order[k - 1]][m]) / (high - low)
    return distance


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` (minimized) and bounded by ``reference``.

    Dimension sweep: sort by the last objective, and sum slabs of the (d−1)-dimensional volume of
    the points seen so far; exact for any dimension, fast enough for hundreds of points in 3-D.
    """
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    if not inside:
        return 0.0
    dims = len(reference)
    if dims == 1:
        return reference[0] - min(p[0] for p in inside)
    inside = sorted(set(inside), key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(inside):
        upper = inside[i + 1][-1] if i + 1 < len(inside) else reference[-1]
        height = upper - point[-1]
        if height <= 0:
            continue
        prefix = [p[:-1] for p in inside[: i + 1]]
        front = [prefix[j] for j in non_dominated(prefix)]
        volume += height * hypervolume(front, reference[:-1])
    return volume


def normalize(values: dict[str, float], objectives: Sequence[str], metric: str, direction: str,
              teacher: dict[str, float],
              keys: dict[str, tuple[str, str]] | None = None) -> Point:  # fmt: skip
    """A trial's objectives as a point to minimize (see the module docstring). ``keys`` maps a
    plug-in objective's config name to its measured key and direction (built-ins: the name itself,
    minimized); a maximized cost is taken as the teacher's value over the trial's."""
    point = []
    for name in objectives:
        if name == "accuracy":
            base, value = teacher[metric], values[metric]
            drop = base - value if direction == "maximize" else value - base
            point.append(drop / abs(base) if base else drop)
            continue
        key, sense = (keys or {}).get(name, (name, "minimize"))
        if key == "latency_ms" and values.get("speedup"):
            point.append(1 / values["speedup"])  # timed beside the teacher: load cancels out
            continue
        ratio = values[key] / teacher[key] if teacher.get(key) else values[key]
        point.append(ratio if sense == "minimize" else (1 / ratio if ratio else math.inf))
    return tuple(point)


def reference_point(objectives: Sequence[str]) -> Point:
    return tuple(ACCURACY_REFERENCE if o == "accuracy" else COST_REFERENCE for o in objectives)
