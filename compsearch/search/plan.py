"""One-shot recipes: the integer program over the sensitivity table (AutoQuantize / HAWQ-V3 style).

Choose one option per searched unit to minimize the summed sensitivity (see
:mod:`compsearch.search.sensitivity`) subject to the study's latency and size bounds, with the
costs predicted by the table's cost model (:mod:`compsearch.search.costmodel`: a sum over
decisions, linear in log(cost) or in cost; ``scipy.optimize.milp``). Solved along a ladder of
bounds — from the study's own bound (or the reference's cost when there is none) down towards the
cheapest point of the space — it gives a handful of recipes spread along the cost axis.
Pruning and quantization do not add up exactly (a 4-bit layer that is also pruned saves less than
both alone), so each solution's costs are then measured on its real structure (``measure``), the
log-linear fit (where it is the form in use) is fitted again with every measurement so far in (on
a copy of the table: it learns the region the solver picks from, which single changes and random
recipes describe poorly; the sum over blocks is left as measured), and,
where one breaks a bound the study sets, the bound given to the solver is tightened by the excess
and solved again (a few rounds); a rung whose solves all miss its aim keeps the least sensitive
of them that meets the study's own bounds, or is left out, and ``log`` hears which and why. A
cost the study does not bound only spreads the rungs: its measurement is recorded, never a reason
to drop a plan (a model that compression does not speed up would lose its plans to timer noise).
The ladder's foot is the measured cost of the combination the model finds cheapest, so every rung
is one the model can reach. A search
enqueues them as its first trials beside the uniform baselines (``search.plans``), so the sampler
starts from them and the study's front must beat them after the same fine-tune; ``compsearch plan
CONFIG`` writes them alone, without searching. Their costs are predictions until a trial measures
them; every plan says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from compsearch.search.costmodel import bound_of, decisions, value_of
from compsearch.search.sensitivity import COSTS, Sensitivity, refit

Measure = Callable[[dict[str, object]], dict[str, float]]
NOISE_MARGIN = {"latency_ms": 0.05}  # a plan aims this far under a latency bound
#: what one combination the ladder measured counts for, in rows of the table, when the log-linear
#: fit is fitted again; 0: the table as measured (on mnist's five tables at f3a06ec, an AMD EPYC
#: with VNNI: 20 of 20 rungs planned with 5, 0 without)
LEARN_WEIGHT = 5


@dataclass
class Plan:
    params: dict[str, object]  # the searched units' choices
    bounds: dict[str, float]  # the cost bounds it was solved under
    predicted: dict[str, float]  # its summed loss and predicted costs (not measured)
    measured: dict[str, float] = field(default_factory=dict)  # its costs, measured untrained

    def describe(self) -> str:
        parts = [f"{c} <= {v:.4g}" for c, v in self.bounds.items()]
        guess = ", ".join(f"{c} {v:.4g}" for c, v in self.predicted.items())
        text = f"one-shot ILP under {' and '.join(parts) or 'no bound'} (predicted: {guess}"
        if self.measured:
            text += "; measured: " + ", ".join(f"{c} {v:.4g}" for c, v in self.measured.items())
        return text + ")"


def solve(table: Sensitivity, bounds: dict[str, float]) -> dict[str, object] | None:
    """The least-sensitivity choice of every unit with every predicted cost within ``bounds``;
    None when no combination fits."""
    choices = decisions(table, list(bounds))
    keys = [(d, o) for d in choices for o in d.options]
    if not keys:
        return {}
    loss = np.array([o.loss for _, o in keys])
    rows, lower, upper = [], [], []
    for decision in choices:  # exactly one option per decision
        rows.append([1.0 if d is decision else 0.0 for d, _ in keys])
        lower.append(1.0)
        upper.append(1.0)
    for cost, bound in bounds.items():  # the cost model's linear form (see costmodel)
        rows.append([o.terms[cost] for _, o in keys])
        lower.append(-np.inf)
        upper.append(bound_of(table, cost, bound))
    result = milp(
        c=loss,
        constraints=LinearConstraint(np.array(rows), np.array(lower), np.array(upper)),
        integrality=np.ones(len(keys)),
        bounds=Bounds(0, 1),
        options={"time_limit": 30},
    )
    if result.x is None:
        return None
    chosen: dict[str, object] = {}
    for (_, option), x in zip(keys, result.x, strict=True):
        if x > 0.5:
            chosen.update(option.params)
    return chosen


def _cheapest_options(table: Sensitivity, cost: str) -> list:
    return [min(d.options, key=lambda o: o.terms[cost]) for d in decisions(table, [cost])]


def cheapest_params(table: Sensitivity, cost: str) -> dict[str, object]:
    """Every decision at the option the cost model finds cheapest in ``cost``."""
    return {p: v for option in _cheapest_options(table, cost) for p, v in option.params.items()}


def cheapest(table: Sensitivity, cost: str) -> float:
    """The least predicted ``cost`` any combination reaches."""
    return value_of(table, cost, sum(o.terms[cost] for o in _cheapest_options(table, cost)))


def ladder(table: Sensitivity, limits: dict[str, float], points: int,
           measure: Measure | None = None, rounds: int = 4,
           log: Callable[[str], None] | None = None) -> list[Plan]:  # fmt: skip
    """Up to ``points`` distinct plans along the cost axis (see the module docstring).
    ``limits`` holds the study's hard bounds on the costs the table measured; ``measure(params)``
    returns a plan's real costs; ``log`` hears why a rung has no plan."""
    costs = [c for c in COSTS if c in table.base]
    if measure is not None and LEARN_WEIGHT > 0:
        table, measure = _learning(table, measure, costs)
    lows = {}
    for cost in costs:  # the cheapest combination, measured where it can be: the ladder's foot
        lows[cost] = cheapest(table, cost)
        if measure is not None:
            real = measure(cheapest_params(table, cost)).get(cost)
            lows[cost] = max(lows[cost], real if real is not None else 0.0)
    plans: list[Plan] = []
    over = {c: lows[c] for c in costs if c in limits and lows[c] > limits[c]}
    if over:  # every rung would aim past the bound
        if log is not None:
            listed = ", ".join(
                f"{c} {v:.4g} over its bound {limits[c]:.4g}" for c, v in over.items()
            )
            log(f"no plan: the space's cheapest combination measures {listed}")
        return plans
    seen: list[dict] = []
    for rung, fraction in enumerate(fractions(points), start=1):
        targets = {}
        for cost in costs:  # a measured bound keeps a margin for timer noise
            top = min(_margined(cost, limits.get(cost, table.base[cost])), table.base[cost])
            targets[cost] = lows[cost] + fraction * max(0.0, top - lows[cost])
        plan = _fitted(table, targets, measure, rounds, limits)
        if isinstance(plan, str):
            if log is not None:
                log(f"plan rung {rung} of {points} left out: {plan}")
            continue
        if plan.bounds != targets and log is not None:
            log(f"plan rung {rung} of {points}: over its aim after {rounds} solves, kept under the "
                f"study's bound ({_listed(plan.measured, {}, targets, every=True)})")  # fmt: skip
        if plan.params in seen:
            continue
        seen.append(plan.params)
        plans.append(plan)
    return plans


def _learning(table: Sensitivity, measure: Measure,
              costs: list[str]) -> tuple[Sensitivity, Measure]:  # fmt: skip
    """A copy of ``table`` (the study's stays as measured) whose cost model is fitted again after
    each measurement, with every one so far in; and the measure that does it."""
    learned = copy.deepcopy(table)
    seen: list[tuple[dict, dict[str, float]]] = []

    def measured(params: dict[str, object]) -> dict[str, float]:
        real = measure(params)
        if all(c in real for c in costs):
            seen.append((dict(params), {c: real[c] for c in costs}))
            refit(learned, seen, LEARN_WEIGHT)
        return real

    return learned, measured


def _fitted(table: Sensitivity, targets: dict[str, float], measure: Measure | None,
            rounds: int, limits: dict[str, float]) -> Plan | str:  # fmt: skip
    """The rung's plan, or why it has none. Where every solve measured over the rung's aim, the
    least sensitive of them that still meets the study's own bounds (less the top rung's margin
    for timer noise) is kept, under those bounds: the cost model can miss its own picks by more
    than a rung's spacing (on mnist at 47a558d, 9 of 10 studies got no plan; seed 0's rungs
    measured 16-43 % over their aims after up to four solves, some under the study's bound)."""
    bounds = dict(targets)
    over: dict[str, float] = {}
    measured: dict[str, float] = {}
    within: list[Plan] = []  # solved, measured over the aim, under the study's bounds
    for _ in range(rounds if measure is not None else 1):
        chosen = solve(table, bounds)
        if chosen is None:
            aims = ", ".join(f"{c} <= {v:.4g}" for c, v in bounds.items())
            reason = f"no combination meets {aims} as the cost model predicts them" + (
                f" (tightened after measuring {_listed(measured, over)})" if over else ""
            )
            return _least(within, limits) or reason
        plan = Plan(chosen, dict(targets), table.predict(chosen))
        if measure is None:
            return plan
        plan.measured = measured = measure(chosen)
        over = {c: measured[c] / targets[c] for c in targets if c in limits
                and c in measured and targets[c] > 0 and measured[c] > targets[c]}  # fmt: skip
        if not over:
            return plan
        if all(measured[c] <= _margined(c, limits[c]) for c in over):
            within.append(plan)
        for cost, ratio in over.items():  # ask the solver for that much less, predicted
            bounds[cost] = min(bounds[cost], plan.predicted[cost] / ratio)
    tries = f"{rounds} solve{'s' if rounds != 1 else ''}"
    return _least(within, limits) or f"still over after {tries}: {_listed(measured, over, targets)}"


def _least(plans: list[Plan], limits: dict[str, float]) -> Plan | None:
    """The least sensitive of ``plans``, now under the study's bounds (``limits``, less the
    margin a measured bound keeps for timer noise)."""
    if not plans:
        return None
    best = min(plans, key=lambda plan: plan.predicted.get("loss", 0.0))
    best.bounds = {c: _margined(c, limits[c]) if c in limits else v for c, v in best.bounds.items()}
    return best


def _margined(cost: str, bound: float) -> float:
    """A measured bound less its margin for timer noise: what a plan aims under."""
    return bound * (1 - NOISE_MARGIN.get(cost, 0.0))


def _listed(measured: dict[str, float], over: dict[str, float],
            targets: dict[str, float] | None = None, every: bool = False) -> str:  # fmt: skip
    parts = []
    for cost in targets if every and targets else over:
        if cost not in measured:
            continue
        aim = f" against its aim {targets[cost]:.4g}" if targets else ""
        ratio = f" ({over[cost]:.2f}x)" if cost in over else ""
        parts.append(f"{cost} {measured[cost]:.4g}{aim}{ratio}")
    return ", ".join(parts)


def fractions(points: int) -> list[float]:
    """How far from the cheapest reachable cost to the bound each rung sits, most accurate first;
    never below 30 %: the cheapest corners of a space lose too much to be worth a trial."""
    if points <= 1:
        return [1.0][:points]
    return [1.0 - 0.7 * i / (points - 1) for i in range(points)]
