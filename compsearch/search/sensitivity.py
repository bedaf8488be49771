"""Sensitivity, once per study: how far each single choice moves the deploy form from the teacher.

For every searched unit — a format (``fmt:<unit>``), a keep ratio (``keep:<unit>:<kind>``), a
droppable block (``drop:<block>``) — and every choice on its menu, the study's reference recipe
(every unit at its most precise choice: float or the widest format, keep 1, no block dropped) is
changed in that one unit, compressed with no fine-tuning through the same
:func:`~compsearch.pipeline.compress` as a trial, and measured:

* ``loss`` — the distillation output loss of the deploy form against the teacher's outputs (KL of
  the softened logits at temperature 1, or the embedding loss for an embedding task), averaged
  over ``batches`` batches of the study's teacher cache (training-split data, never validation);
* ``size_bytes`` — the exact bytes of the artifact that change alone would ship;
* ``latency_ms`` — its latency, measured as the study measures trials (with a latency table,
  the table's prediction: the table is checked against measurement on the trials).

The reference recipe itself is row ``base``. Costs of pruning and quantization do not add up from
single changes (a 4-bit layer that is also pruned saves less than both alone), so the table also
measures ``samples`` random recipes of the space, untrained (kept in the table), to fit a
log-linear cost model on every row (one weight per unit and choice: ``fit_<cost>``) and to choose,
per cost, between it and a sum over blocks (:mod:`compsearch.search.costmodel`); the chosen model
*predicts* a recipe's costs for the one-shot plan (:mod:`compsearch.search.plan`) and the surrogate
sampler (:mod:`compsearch.search.surrogate`). A prediction is always labelled as one, and every trial still
measures its own.

The table is cached in the study folder (``sensitivity.json``) and in the runs root under a digest
of everything it depends on (task, model fingerprint, space, device, latency settings, torch), so
studies of the same space share one measurement; it is also stored in the study's attributes, so
every worker and sampler (the Ray driver's too) reads the same table.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch

from compsearch._files import write_text_atomic
from compsearch.objectives.constraints import ratio_to_teacher
from compsearch.paths import runs_root
from compsearch.pipeline import compress
from compsearch.search.costmodel import choose, decode, encode, predict_cost, weights
from compsearch.search.trial import LATENCY, SearchContext, measure_structure, zero_shot_loss
from compsearch.spaces.space import FLOAT, Space, parse_label

FILE, ATTR = "sensitivity.json", "compsearch_sensitivity"
COSTS = ("latency_ms", "size_bytes")
VERSION = 3  # 2: the cost model ridged towards the single changes; 3: the blocks form beside it


@dataclass
class Sensitivity:
    """Per searched parameter, per choice: ``{"loss", "size_bytes", "latency_ms"}`` (absolute,
    measured on the reference recipe changed in that parameter alone)."""

    base: dict[str, float]
    reference: dict[str, object]  # the reference recipe's parameters
    options: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    #: the fitted cost model, log-linear: log(cost) = intercept + the chosen units' ``fit_<cost>``
    intercept: dict[str, float] = field(default_factory=dict)
    #: median relative error of the fit on the random recipes, each left out of it, per cost
    fit_error: dict[str, float] = field(default_factory=dict)
    #: the random recipes the cost model was fitted on: ``{"params", "costs"}`` each (measured)
    samples: list[dict] = field(default_factory=list)
    #: parameter -> the droppable block its unit lies in (see compsearch.search.costmodel)
    blocks: dict[str, str] = field(default_factory=dict)
    #: per cost, the cost model's form in use and every form's error on the random recipes
    model: dict[str, str] = field(default_factory=dict)
    model_error: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": VERSION, "base": self.base, "reference": self.reference,
                "options": self.options, "seconds": self.seconds, "intercept": self.intercept,
                "fit_error": self.fit_error, "samples": self.samples, "blocks": self.blocks,
                "model": self.model, "model_error": self.model_error}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        return cls(data["base"], data["reference"], data["options"], data.get("seconds", 0.0),
                   data.get("intercept", {}), data.get("fit_error", {}),
                   data.get("samples", []), data.get("blocks", {}), data.get("model", {}),
                   data.get("model_error", {}))  # fmt: skip

    def value_of(self, param: str, value: object, what: str) -> float:
        """``what`` (loss or a cost) measured for ``param`` at ``value``; a keep ratio between
        measured ones is interpolated linearly; a value outside the table counts as the
        reference."""
        entries = self.options.get(param)
        mix = weights(entries, param, value) if entries is not None else []
        if not mix:
            return 0.0 if what == "loss" else self.base.get(what, 0.0)
        return sum(w * entries[k][what] for k, w in mix)

    def structure(self, params: dict[str, object]) -> tuple:
        """What decides the recipe's deploy form, and so its costs and zero-shot loss: the
        table's parameters (training knobs such as ``lr`` are not among them), a dropped block's
        own units left out."""
        dropped = {b for b in set(self.blocks.values()) if params.get(f"drop:{b}") is True}
        out = []
        for param in sorted(self.options):
            value = params.get(param, self.reference[param])
            if self.blocks.get(param) in dropped and not param.startswith("drop:"):
                value = None
            out.append(round(value, 9) if isinstance(value, float) else value)
        return tuple(out)

    def predict(self, params: dict[str, object]) -> dict[str, float]:
        """Summed single-unit losses, and each cost as its cost model predicts it."""
        out = {"loss": sum(self.value_of(p, params.get(p, self.reference[p]), "loss")
                           for p in self.options)}  # fmt: skip
        out.update({c: predict_cost(self, params, c) for c in COSTS if c in self.base})
        return out


def menus(space: Space, grid: int = 3) -> dict[str, list[object]]:
    """Every searched unit's menu, in the order the space suggests them. A keep ratio lists its
    steps where there are at most ``grid``, else its ends and middle (interpolated between)."""
    out: dict[str, list[object]] = {}
    for unit in space.quant_units:
        if len(unit.choices) > 1:
            out[f"fmt:{unit.name}"] = [c.label for c in unit.choices]
    for unit in space.keep_units:
        keep = unit.keep
        if keep.fixed:
            continue
        if keep.step:
            count = round((keep.high - keep.low) / keep.step)
            values = [round(keep.low + i * keep.step, 10) for i in range(count + 1)]
            if len(values) > grid:  # the ends and the middle; the rest is interpolated
                values = [values[0], values[len(values) // 2], values[-1]]
        else:
            values = [keep.low + (keep.high - keep.low) * i / (grid - 1) for i in range(grid)]
        out[f"keep:{unit.name}"] = values
    for block in space.drop_blocks:
        out[f"drop:{block}"] = [False, True]
    return out


def block_params(space: Space, params: list[str]) -> dict[str, str]:
    """Each parameter whose unit lies inside a droppable block -> that block."""
    drops, out = set(space.drop_blocks), {}
    for param in params:
        kind, _, rest = param.partition(":")
        unit = rest.rsplit(":", 1)[0] if kind == "keep" else rest
        block = unit if unit in drops else space.info.block_of.get(unit)
        if block in drops:
            out[param] = block
    return out


def most_precise(labels: list[str]) -> str:
    """The choice that changes the model least: float, else the widest weights, then activations."""
    if FLOAT in labels:
        return FLOAT

    def width(label: str) -> tuple[int, int]:
        try:
            choice = parse_label(label)
        except Exception:  # a plug-in format's own label: keep the menu's order
            return (0, 0)
        return (choice.w_bits, choice.a_bits)

    return max(labels, key=width)


def reference_params(space: Space) -> dict[str, object]:
    """The reference recipe: every unit at its most precise choice, the distillation settings and
    learning rate in the middle of their ranges (as the uniform baselines)."""
    params = space.uniform_params(FLOAT, 1.0)
    for param, values in menus(space).items():
        if param.startswith("fmt:"):
            params[param] = most_precise(values)
        elif param.startswith("keep:"):
            params[param] = max(values)
        else:
            params[param] = False
    return params


def default_samples(table_menus: dict) -> int:
    """Random recipes the cost model is fitted on, beside the single changes."""
    return 12 + len(table_menus) // 4


def digest(ctx: SearchContext, batches: int) -> str:
    config = ctx.config
    key = {"task": ctx.task.name, "fingerprint": ctx.space.info.fingerprint,
           "space": config.raw.get("space", {}), "device": config.device,
           "latency": config.raw.get("latency", {}), "objectives": list(config.objectives),
           "torch": torch.__version__, "batches": batches, "version": VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure(ctx: SearchContext, batches: int = 2, log=print,
            samples: int | None = None) -> Sensitivity:  # fmt: skip
    """Measure the table (see the module docstring): one compression per choice, no training."""
    started = time.perf_counter()
    reference = reference_params(ctx.space)
    table_menus = menus(ctx.space)
    count = sum(len(v) - 1 for v in table_menus.values()) + 1
    log(
        f"measuring sensitivity: {count} single-unit compressions of {ctx.task.name} and "
        f"{samples if samples is not None else default_samples(table_menus)} random ones, no training"
    )
    base = _one(ctx, reference, batches)
    table = Sensitivity(base, dict(reference))
    for param, values in table_menus.items():
        entries: dict[str, dict[str, float]] = {}
        for value in values:
            if value == reference[param]:
                entries[encode(value)] = dict(base)
            else:
                entries[encode(value)] = _one(ctx, {**reference, param: value}, batches)
        table.options[param] = entries
    rng = random.Random(0)
    count = samples if samples is not None else default_samples(table_menus)
    for _ in range(count):
        params = {**reference, **{p: rng.choice(v) for p, v in table_menus.items()}}
        table.samples.append({"params": params, "costs": compressed_costs(ctx, params)[0]})
    _fit(table, _rows(table) + _sample_rows(table), count)
    table.blocks = block_params(ctx.space, list(table.options))
    choose(table, [c for c in COSTS if c in base])
    table.seconds = time.perf_counter() - started
    log(f"sensitivity measured in {table.seconds:.0f} s")
    return table


def refit(table: Sensitivity, measured: list[tuple[dict, dict[str, float]]],
          weight: int) -> None:  # fmt: skip
    """Fit ``table``'s log-linear cost model again with the recipes ``measured`` (parameters,
    measured costs) added, each counted ``weight`` times: where a caller (the one-shot plans'
    ladder) measures the combinations it picks, the model learns the region it is asked about.
    Its error stays the leave-one-out error on the table's random recipes."""
    extra = [({**table.reference, **params}, costs) for params, costs in measured]
    _fit(table, _rows(table) + extra * weight + _sample_rows(table), len(table.samples))


def _rows(table: Sensitivity) -> list[tuple[dict, dict[str, float]]]:
    """The reference recipe and every single change, with what they measured."""
    reference = table.reference
    return [(reference, table.base)] + [({**reference, p: decode(p, k)}, e)
                                        for p, entries in table.options.items()
                                        for k, e in entries.items()]  # fmt: skip


def _sample_rows(table: Sensitivity) -> list[tuple[dict, dict[str, float]]]:
    return [(s["params"], s["costs"]) for s in table.samples]


def _fit(table: Sensitivity, rows: list[tuple[dict, dict[str, float]]], random_rows: int,
         anchor: float = 1.0) -> None:  # fmt: skip
    """Least squares of every cost's logarithm on the units' choices (so savings multiply, as
    pruning and quantization do, and no prediction is negative), over ``rows``, ridged towards the
    single changes' own log ratios (``anchor`` is worth that many rows): with fewer rows than
    choices, the random recipes correct the single changes rather than replace them. The fit
    error is measured on the last ``random_rows`` rows (the random recipes), each left out of the
    fit that predicts it."""
    columns = [(p, k) for p, entries in table.options.items() for k in entries]
    index = {c: i for i, c in enumerate(columns)}
    design = np.zeros((len(rows), len(columns) + 1))
    design[:, -1] = 1.0
    for r, (params, _) in enumerate(rows):
        for p, entries in table.options.items():
            for k, w in weights(entries, p, params[p]):
                design[r, index[(p, k)]] = w
    ridge = anchor * np.eye(len(columns) + 1)
    held = range(len(rows) - random_rows, len(rows))
    for cost in [c for c in COSTS if c in table.base]:
        target = np.log(np.maximum([costs[cost] for _, costs in rows], 1e-12))
        base = math.log(max(table.base[cost], 1e-12))
        prior = anchor * np.array([math.log(max(table.options[p][k][cost], 1e-12)) - base
                                   for p, k in columns] + [base])  # fmt: skip

        def solve(keep: np.ndarray, target=target, prior=prior) -> np.ndarray:
            x, y = design[keep], target[keep]
            return np.linalg.solve(x.T @ x + ridge, x.T @ y + prior)

        solution = solve(np.ones(len(rows), dtype=bool))
        for (p, k), weight in zip(columns, solution[:-1], strict=True):
            table.options[p][k][f"fit_{cost}"] = float(weight)
        table.intercept[cost] = float(solution[-1])
        errors = []
        for row in held:  # leave one out: the error on a recipe the fit did not see
            keep = np.arange(len(rows)) != row
            errors.append(abs(math.exp(design[row] @ solve(keep) - target[row]) - 1.0))
        if errors:
            table.fit_error[cost] = float(np.median(errors))


def _one(ctx: SearchContext, params: dict[str, object], batches: int) -> dict[str, float]:
    row, result = compressed_costs(ctx, params)
    return {"loss": zero_shot_loss(ctx, result.deployed, batches), **row}


def probe(ctx: SearchContext, params: dict[str, object], batches: int) -> dict[str, float]:
    """A candidate's costs and zero-shot output loss, untrained (the surrogate sampler's probe);
    ``table`` is 1 where its latency is the latency table's prediction."""
    measured, result = untrained_measure(ctx, {**reference_params(ctx.space), **params})
    out = {c: float(measured[c]) for c in COSTS if isinstance(measured.get(c), (int, float))}
    out["table"] = float(measured.get("latency_source") == "predicted")
    return {"loss": zero_shot_loss(ctx, result.deployed, batches), **out}


def untrained_costs(ctx: SearchContext, params: dict[str, object]) -> dict[str, float]:
    """The costs of the reference recipe changed by ``params``, measured untrained as a trial
    measures them (a plan's): latency end to end, never the latency table's prediction (on
    minilm the table put the plan aimed 5 % under the bound 5-7 % over it, so every top rung was
    screened), timed beside the teacher and given in the units of the study's bounds."""
    measured, _ = untrained_measure(ctx, {**reference_params(ctx.space), **params},
                                    predicted=False)  # fmt: skip
    costs = {c: float(measured[c]) for c in COSTS if isinstance(measured.get(c), (int, float))}
    if LATENCY in costs and measured.get("speedup") and ctx.teacher.get(LATENCY):
        costs[LATENCY] = ratio_to_teacher(LATENCY, measured) * ctx.teacher[LATENCY]  # paired
    return costs


def compressed_costs(ctx: SearchContext, params: dict[str, object]):
    """The costs of the recipe ``params`` make, measured on its deploy form with no training (as
    a trial measures them), and the compression result."""
    measured, result = untrained_measure(ctx, params)
    costs = {c: float(measured[c]) for c in COSTS if isinstance(measured.get(c), (int, float))}
    return costs, result


def untrained_measure(ctx: SearchContext, params: dict[str, object], predicted: bool = True,
                      above: tuple[float, bool] | None = None):  # fmt: skip
    """Everything a trial measures once its structure is final (latency — the table's prediction
    where ``predicted`` and the study has a table —, size, speed-up, …), for the recipe ``params``
    make, with no training; and the compression result. ``above``: a latency bound ``(limit,
    relative)`` the timing may stop at once clearly past (as a screened trial's does)."""
    recipe = ctx.space.suggest(optuna.trial.FixedTrial(params))
    measured: dict[str, float | str] = {}

    def on_structure(student, metadata) -> None:
        extra = {"trial": -1, "latency_checks": [], "prediction_only": predicted,
                 "latency_above": above}  # fmt: skip
        measure_structure(ctx, student, metadata, measured, extra)

    result = compress(ctx.task, recipe, steps=0, device=ctx.device, cache=ctx.cache,
                      on_structure=on_structure)  # fmt: skip
    return measured, result


def load_or_measure(ctx: SearchContext, study: optuna.Study, batches: int = 2,
                    log=print) -> Sensitivity:  # fmt: skip
    """The study's table: from its attributes, its folder, the shared cache, or measured now."""
    stored = study.user_attrs.get(ATTR)
    if stored is not None:
        return Sensitivity.from_dict(stored)
    local = ctx.folder / FILE
    shared = runs_root() / "_sensitivity" / f"{digest(ctx, batches)}.json"
    for path in (local, shared):
        if path.exists():
            table = Sensitivity.from_dict(json.loads(path.read_text()))
            break
    else:
        table = measure(ctx, batches, log)
        write_text_atomic(shared, json.dumps(table.to_dict(), indent=1, sort_keys=True))
    write_text_atomic(local, json.dumps(table.to_dict(), indent=1, sort_keys=True))
    study.set_user_attr(ATTR, table.to_dict())
    return table


def read(folder: Path) -> Sensitivity | None:
    path = Path(folder) / FILE
    return Sensitivity.from_dict(json.loads(path.read_text())) if path.exists() else None
