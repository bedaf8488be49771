"""Cost models over the sensitivity table: a recipe's latency and size, predicted from single changes.

Two forms; each cost of a table uses the one with the smaller error on the table's random recipes
(measured untrained, never used to build the other form's prediction of themselves):

* ``log-linear`` — log(cost) is an intercept plus one weight per unit and choice, fitted by least
  squares over the single changes and the random recipes (its error is leave-one-out). Savings
  multiply, which fits a model whose units each scale the whole forward (a CNN's layers at similar
  cost), and overstates savings that in fact add up.
* ``blocks`` — what a latency table and a file's bytes are: sums. A droppable block costs what
  dropping it saves (measured); its units' single changes scale that block's own cost (they
  multiply inside a block: a 4-bit block that is also pruned saves less than both alone); a dropped
  block costs nothing; a unit outside every droppable block adds its single change. A transformer,
  whose blocks are most of its latency and its embedding half of its bytes, is this form.

Both are sums over *decisions* — a unit outside droppable blocks, or a droppable block with all its
units chosen jointly — so the one-shot integer program (:mod:`compsearch.search.plan`) takes either
as one linear constraint: on log(cost) or on cost.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

LOG, BLOCKS = "log-linear", "blocks"
MAX_JOINT = 4096  # a block with more joint choices than this is left as separate decisions


@dataclass
class Option:
    params: dict[str, object]  # the decision's parameters at this option
    keys: dict[str, str]  # the same, as the table's keys
    loss: float  # its summed single-change sensitivity
    terms: dict[str, float]  # per cost, its term in that cost's linear form


@dataclass
class Decision:
    name: str
    options: list[Option]


def encode(value: object) -> str:
    """A parameter value as the table's key."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def decode(param: str, key: str) -> object:
    if param.startswith("drop:"):
        return key == "true"
    if param.startswith("keep:"):
        return float(key)
    return key


def weights(entries: dict, param: str, value: object) -> list[tuple[str, float]]:
    """``value`` as a mix of the table's keys: itself, or (a keep ratio between two measured
    ones) its two neighbours, weighted linearly."""
    key = encode(value)
    if key in entries or not param.startswith("keep:"):
        return [(key, 1.0)] if key in entries else []
    grid = sorted((float(k), k) for k in entries)
    x = float(value)
    if x <= grid[0][0]:
        return [(grid[0][1], 1.0)]
    for (x0, k0), (x1, k1) in itertools.pairwise(grid):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0)
            return [(k0, 1.0 - t), (k1, t)]
    return [(grid[-1][1], 1.0)]


def form(table, cost: str) -> str:
    return table.model.get(cost, LOG)


def constant(table, cost: str) -> float:
    """The constant of ``cost``'s linear form (in log(cost) for the log-linear form)."""
    if form(table, cost) == BLOCKS:
        return table.base[cost]
    return table.intercept.get(cost, math.log(max(table.base[cost], 1e-12)))


def value_of(table, cost: str, terms: float) -> float:
    """The cost a linear form's constant plus ``terms`` stands for."""
    total = constant(table, cost) + terms
    return math.exp(total) if form(table, cost) == LOG else max(total, 0.0)


def bound_of(table, cost: str, bound: float) -> float:
    """A bound on ``cost`` as a bound on its linear form's terms."""
    if form(table, cost) == LOG:
        return math.log(max(bound, 1e-12)) - constant(table, cost)
    return bound - constant(table, cost)


def log_term(table, param: str, key: str, cost: str) -> float:
    """A unit's choice's term in log(cost): fitted, or its single change's log ratio."""
    entry = table.options[param][key]
    if cost in table.intercept:
        return entry[f"fit_{cost}"]
    return math.log(max(entry[cost], 1e-12) / max(table.base[cost], 1e-12))


def _change(table, param: str, value: object, cost: str) -> float:
    """What the single change ``param`` = ``value`` adds to ``cost`` (negative: it saves)."""
    entries = table.options[param]
    return sum(w * entries[k][cost] for k, w in weights(entries, param, value)) - table.base[cost]


def block_cost(table, block: str, cost: str) -> float:
    """What ``block`` costs in the reference recipe: what dropping it saves (never less than a
    single change inside it saves, which timer noise could make it)."""
    saved = -_change(table, f"drop:{block}", True, cost)
    inside = [-_change(table, p, decode(p, k), cost) for p in members(table, block)
              for k in table.options[p]]  # fmt: skip
    return max([saved, *inside, 1e-12])


def members(table, block: str) -> list[str]:
    """The block's units' parameters, without its drop parameter."""
    return [p for p, b in table.blocks.items() if b == block and p != f"drop:{block}"]


def joint_blocks(table) -> list[str]:
    """The droppable blocks decided jointly (see ``MAX_JOINT``)."""
    out = []
    for block in dict.fromkeys(table.blocks.values()):
        if f"drop:{block}" not in table.options:
            continue
        if math.prod(len(table.options[p]) for p in members(table, block)) <= MAX_JOINT:
            out.append(block)
    return out


def _block_term(table, block: str, values: dict[str, object], cost: str) -> float:
    """The block's cost minus its reference cost, with its units at ``values``."""
    if values.get(f"drop:{block}"):
        return -block_cost(table, block, cost)
    whole = block_cost(table, block, cost)
    scale = 1.0
    for param in members(table, block):
        scale *= max(0.0, 1.0 + _change(table, param, values[param], cost) / whole)
    return whole * scale - whole


def predict_cost(table, params: dict[str, object], cost: str) -> float:
    """``cost`` of the recipe ``params`` make, as the table's form for it predicts."""
    chosen = {p: params.get(p, table.reference[p]) for p in table.options}
    if form(table, cost) == LOG:
        logs = sum(w * log_term(table, p, k, cost) for p, v in chosen.items()
                   for k, w in weights(table.options[p], p, v))  # fmt: skip
        return value_of(table, cost, logs)
    joint = joint_blocks(table)
    grouped = {p for b in joint for p in [*members(table, b), f"drop:{b}"]}
    total = sum(_change(table, p, v, cost) for p, v in chosen.items() if p not in grouped)
    total += sum(_block_term(table, b, chosen, cost) for b in joint)
    return value_of(table, cost, total)


def decisions(table, costs: list[str]) -> list[Decision]:
    """The table's choices as independent decisions, each option with its loss and its term in
    every cost's linear form (see the module docstring)."""
    joint = joint_blocks(table)
    grouped = {p for b in joint for p in [*members(table, b), f"drop:{b}"]}
    out = []
    for param, entries in table.options.items():
        if param in grouped:
            continue
        options = []
        for key, entry in entries.items():
            value = decode(param, key)
            terms = {c: log_term(table, param, key, c) if form(table, c) == LOG
                     else _change(table, param, value, c) for c in costs}  # fmt: skip
            options.append(Option({param: value}, {param: key}, entry["loss"], terms))
        out.append(Decision(param, options))
    for block in joint:
        out.append(Decision(block, _block_options(table, block, costs)))
    return out


def _block_options(table, block: str, costs: list[str]) -> list[Option]:
    inside, drop = members(table, block), f"drop:{block}"
    reference = {p: encode(table.reference[p]) for p in inside}
    combos = [dict(zip(inside, keys, strict=True))
              for keys in itertools.product(*(table.options[p] for p in inside))]  # fmt: skip
    combos = [{**c, drop: "false"} for c in combos] + [{**reference, drop: "true"}]
    options = []
    for keys in combos:
        values = {p: decode(p, k) for p, k in keys.items()}
        loss = sum(table.options[p][k]["loss"] for p, k in keys.items())
        terms = {}
        for cost in costs:
            if form(table, cost) == LOG:
                terms[cost] = sum(log_term(table, p, k, cost) for p, k in keys.items())
            else:
                terms[cost] = _block_term(table, block, values, cost)
        options.append(Option(values, keys, loss, terms))
    return options


def choose(table, costs: list[str]) -> None:
    """Per cost, the form with the smaller median relative error on the table's random recipes
    (``table.model``; both errors in ``table.model_error``). Without random recipes: log-linear."""
    for cost in costs:
        rows = [s for s in table.samples if cost in s["costs"]]
        if not rows:
            continue
        table.model[cost] = BLOCKS
        errors = [abs(predict_cost(table, s["params"], cost) / max(s["costs"][cost], 1e-12) - 1)
                  for s in rows]  # fmt: skip
        table.model_error[cost] = {BLOCKS: statistics.median(errors)}
        if cost in table.fit_error:
            table.model_error[cost][LOG] = table.fit_error[cost]
        best = min(table.model_error[cost], key=table.model_error[cost].get)
        table.model[cost] = best
