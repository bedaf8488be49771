"""Why a front is empty or small: how many trials broke each bound, and the trials closest to
meeting them all — what the end of a search, ``status`` and ``pareto`` print, and what ``export
--allow-infeasible`` exports (marked so) when no trial is feasible.

A trial's distance from feasibility is the sum, over the bounds it breaks, of its excess relative to
the bound (a latency 20 % over its bound and an accuracy drop 50 % over its bound: 0.7).
"""

from __future__ import annotations

from compsearch.objectives.constraints import Constraint, format_bytes, ratio_to_teacher
from compsearch.search.results import StudyResults, TrialRow

#: a front smaller than this gets the explanation too
SMALL_FRONT = 3


def measured_rows(results: StudyResults) -> list[TrialRow]:
    """Trials with measurements a bound can be checked on: complete (screened included)."""
    return [r for r in results.rows if r.state == "COMPLETE" and r.measured]


def excesses(row: TrialRow, constraints: tuple[Constraint, ...], metric: str) -> dict[str, float]:
    """Each bound the trial breaks, by its constraint value (> 0)."""
    out = {}
    for constraint in constraints:
        try:
            value = constraint.value(row.measured, metric)
        except KeyError:  # measured before this key existed: nothing to say about this bound
            continue
        if value > 0:
            out[constraint.describe()] = value
    return out


def distance(row: TrialRow, constraints: tuple[Constraint, ...], metric: str) -> float:
    """Sum of relative excesses over the broken bounds (0 for a feasible trial)."""
    by_name = {c.describe(): c for c in constraints}
    return sum(excess / max(abs(by_name[name].limit), 1e-12)
               for name, excess in excesses(row, constraints, metric).items())  # fmt: skip


def least_violating(results: StudyResults, constraints: tuple[Constraint, ...],
                    count: int) -> list[TrialRow]:  # fmt: skip
    rows = measured_rows(results)
    return sorted(rows, key=lambda r: distance(r, constraints, results.metric))[:count]


def explain(results: StudyResults, constraints: tuple[Constraint, ...]) -> list[str]:
    """Lines for a front smaller than :data:`SMALL_FRONT`; none otherwise or without trials."""
    rows = measured_rows(results)
    front = results.front()
    if len(front) >= SMALL_FRONT or not rows or not constraints:
        return []
    lines = [f"the feasible front has {len(front)} of {len(rows)} measured trials; the bounds "
             "they broke:"]  # fmt: skip
    for constraint in constraints:
        broke = [r for r in rows if constraint.describe() in excesses(r, (constraint,),
                                                                      results.metric)]  # fmt: skip
        lines.append(f"  {constraint.describe()}: broken by {len(broke)}")
    infeasible = [r for r in rows if not r.feasible]
    closest = sorted(infeasible, key=lambda r: distance(r, constraints, results.metric))[:3]
    for row in closest:
        shown = ", ".join(_shown(c, row, results) for c in constraints)
        lines.append(f"  closest: trial {row.number} ({shown})")
    if closest:
        lines.append("  to go on: relax the bound most trials break, run more trials, or export "
                     "the closest with `compsearch export <study> --allow-infeasible`")  # fmt: skip
    return lines


def _shown(constraint: Constraint, row: TrialRow, results: StudyResults) -> str:
    """The trial's value of the bound's quantity, and whether it meets the bound."""
    m, metric = row.measured, results.metric
    try:
        value = constraint.value(m, metric)
        if constraint.name == "accuracy_drop":
            key = f"{metric}_drop_rel" if constraint.relative else f"{metric}_drop"
            text = f"drop {m[key] * 100:.2f}%" if constraint.relative else f"drop {m[key]:.4g}"
        elif constraint.relative:
            text = f"{constraint.name.split('_')[0]} {ratio_to_teacher(constraint.name, m):.3g}x"
        elif constraint.name == "latency_ms":
            text = f"latency {m['latency_ms']:.3g} ms"
        else:
            text = f"size {format_bytes(m['size_bytes'])}"
    except KeyError:
        return f"{constraint.name} not measured"
    return f"{text} {'ok' if value <= 0 else 'over'}"
