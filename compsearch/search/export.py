"""Exporting a study's chosen points as recipe files, and ranking exported recipes.

The library side of ``compsearch export`` and ``compsearch train --from-study``: the rules
(:mod:`compsearch.search.select`) pick trials; each becomes its recipe with the trial's provenance.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna

from compsearch.errors import ConfigError
from compsearch.recipes import Recipe, read_recipe, write_recipe
from compsearch.search.explain import excesses, least_violating
from compsearch.search.results import StudyResults, TrialRow, load_results
from compsearch.search.select import best, diverse, knee, parse_bound
from compsearch.search.study import StudyFolder, open_study

#: trials ``--allow-infeasible`` exports from a study with no feasible point
INFEASIBLE_EXPORTS = 3


def trial_recipe(folder: StudyFolder, row: TrialRow, study_name: str) -> Recipe:
    """The recipe of a trial, with its study, number and values in its provenance (a predicted
    latency under ``predicted``, never as measured)."""
    path = folder.path / "trials" / f"{row.number:05d}" / "recipe.yaml"
    if path.exists():
        recipe = read_recipe(path)
    else:  # a trial whose files are elsewhere (another machine): replay its parameters
        from compsearch.search.trial import build_context

        context = build_context(folder.frozen(), folder.path)
        trial = optuna.trial.FixedTrial(row.params, number=row.number)
        recipe = context.space.suggest(trial)
    measured = {k: float(v) for k, v in row.measured.items()
                if isinstance(v, (int, float)) and math.isfinite(v)}  # fmt: skip
    source = row.measured.get("latency_source", "measured")
    predicted = {}
    if source == "predicted":  # a table's value is never written down as measured
        predicted = {k: measured.pop(k) for k in ("latency_ms", "speedup", "latency_table_error")
                     if k in measured}  # fmt: skip
    provenance = dataclasses.replace(recipe.provenance, study=study_name, trial=row.number,
                                     measured=measured, predicted=predicted,
                                     latency_source=source)  # fmt: skip
    return dataclasses.replace(recipe, provenance=provenance)


def choose(
    results: StudyResults,
    best_of: str | None = None,
    where: tuple[str, ...] = (),
    take_knee: bool = False,
    spread: int | None = None,
    name: str | None = None,
) -> list[tuple[str, TrialRow]]:
    """The points the rules pick, named: ``best_of`` an objective under ``where`` bounds, the knee,
    ``spread`` diverse points; none given = the knee, the most accurate and 3 diverse points."""
    chosen: list[tuple[str, TrialRow]] = []
    if best_of:
        bounds = [parse_bound(text, results.metric, results.teacher) for text in where]
        suffix = "".join(f"-{b.name}{b.op.replace('<', 'lt').replace('>', 'gt').replace('=', 'e')}"
                         f"{b.limit:g}" for b in bounds)  # fmt: skip
        chosen.append((f"best-{best_of}{suffix}", best(results, best_of, bounds)))
    if take_knee:
        chosen.append(("knee", knee(results)))
    if spread is not None:
        chosen += [(f"diverse-{i}", row) for i, row in enumerate(diverse(results, spread))]
    if not (best_of or take_knee or spread is not None):
        chosen = [("knee", knee(results)), ("best-accuracy", best(results, "accuracy", []))]
        chosen += [(f"diverse-{i}", row) for i, row in enumerate(diverse(results, 3))]
    if name:
        if len(chosen) != 1:
            raise ConfigError(f"--name: expected one rule to name, but {len(chosen)} were given.")
        chosen = [(name, chosen[0][1])]
    return chosen


def export_recipes(folder: StudyFolder, allow_infeasible: bool = False,
                   **rules) -> list[tuple[Path, TrialRow, StudyResults]]:  # fmt: skip
    """Write the chosen points (see :func:`choose`) to ``<study>/recipes/<name>.yaml``; every rule
    is checked before anything is written. With ``allow_infeasible`` and no feasible trial, the
    three trials closest to feasible are written instead, as ``infeasible-<k>.yaml``, each with the
    bounds it broke in ``provenance.infeasible``."""
    config = folder.frozen()
    study = open_study(config, folder)
    results = load_results(study)
    if allow_infeasible and not results.front():
        closest = least_violating(results, config.constraints, INFEASIBLE_EXPORTS)
        if not closest:
            raise ConfigError("the study has no measured trial yet; run some trials first.")
        recipes = []
        for k, row in enumerate(closest):
            recipe = trial_recipe(folder, row, study.study_name)
            broken = excesses(row, config.constraints, results.metric)
            recipe = dataclasses.replace(recipe, provenance=dataclasses.replace(
                recipe.provenance, infeasible=broken))  # fmt: skip
            recipes.append((f"infeasible-{k}", row, recipe))
    else:
        chosen = choose(results, **rules)
        recipes = [(name, row, trial_recipe(folder, row, study.study_name)) for name, row in chosen]
    return [(write_recipe(recipe, folder.path / "recipes" / f"{name}.yaml"), row, results)
            for name, row, recipe in recipes]  # fmt: skip


def rank_exported(recipes: dict[Path, Recipe], metric: str, direction: str) -> list[Path]:
    """Exported recipes, one per trial (several rules may pick the same point), most accurate
    first by their measured values."""
    sign = 1 if direction == "maximize" else -1
    unique: dict[int | None, tuple[Path, Recipe]] = {}
    for path, recipe in recipes.items():
        unique.setdefault(recipe.provenance.trial, (path, recipe))
    ranked = sorted(
        unique.values(), key=lambda item: -sign * item[1].provenance.measured.get(metric, 0)
    )
    return [path for path, _ in ranked]
