"""``compsearch export runs/<study>``: write chosen points of the feasible front as recipe files.

Rules (any combination; none given = the knee, the most accurate point and 3 diverse points):
``--best OBJECTIVE [--where 'latency_ms <= 5' ...]``, ``--knee``, ``--diverse K``. Files go to
``runs/<study>/recipes/<name>.yaml`` with the measured values and provenance; every rule is checked
before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import optuna

from compsearch.recipes import Recipe, read_recipe, write_recipe
from compsearch.search import StudyFolder, load_results
from compsearch.search.results import StudyResults, TrialRow
from compsearch.search.select import best, diverse, knee, parse_bound
from compsearch.search.study import open_study


def add_parser(commands) -> None:
    parser = commands.add_parser("export", help="export front points as recipes")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.add_argument("--best", metavar="OBJECTIVE", help="accuracy, latency_ms or size_bytes")
    parser.add_argument("--where", action="append", default=[], metavar="BOUND",
                        help="a bound for --best, e.g. 'latency_ms <= 5' (repeatable)")  # fmt: skip
    parser.add_argument("--knee", action="store_true", help="the knee of the front")
    parser.add_argument("--diverse", type=int, metavar="K", help="K points spread over the front")
    parser.add_argument("--name", help="file name for a single exported recipe")
    parser.set_defaults(handler=run)


def recipe_of(
    folder: StudyFolder, row: TrialRow, results: StudyResults, study: optuna.Study
) -> Recipe:
    path = folder.path / "trials" / f"{row.number:05d}" / "recipe.yaml"
    if path.exists():
        recipe = read_recipe(path)
    else:  # a trial whose files are elsewhere (another machine): replay its parameters
        from compsearch.search.trial import build_context

        context = build_context(folder.frozen(), folder.path)
        trial = optuna.trial.FixedTrial(row.params, number=row.number)
        recipe = context.space.suggest(trial)
    measured = {k: float(v) for k, v in row.measured.items() if isinstance(v, (int, float))}
    source = row.measured.get("latency_source", "measured")
    predicted = {}
    if source == "predicted":  # a table's value is never written down as measured
        predicted = {k: measured.pop(k) for k in ("latency_ms", "speedup", "latency_table_error")
                     if k in measured}  # fmt: skip
    provenance = dataclasses.replace(recipe.provenance, study=study.study_name, trial=row.number,
                                     measured=measured, predicted=predicted,
                                     latency_source=source)  # fmt: skip
    return dataclasses.replace(recipe, provenance=provenance)


def choose(args, results: StudyResults) -> list[tuple[str, TrialRow]]:
    chosen: list[tuple[str, TrialRow]] = []
    if args.best:
        bounds = [parse_bound(text, results.metric) for text in args.where]
        suffix = "".join(f"-{b.name}{b.op.replace('<', 'lt').replace('>', 'gt').replace('=', 'e')}"
                         f"{b.limit:g}" for b in bounds)  # fmt: skip
        chosen.append((f"best-{args.best}{suffix}", best(results, args.best, bounds)))
    if args.knee:
        chosen.append(("knee", knee(results)))
    if args.diverse:
        chosen += [(f"diverse-{i}", row) for i, row in enumerate(diverse(results, args.diverse))]
    if not (args.best or args.knee or args.diverse):
        chosen = [("knee", knee(results)), ("best-accuracy", best(results, "accuracy", []))]
        chosen += [(f"diverse-{i}", row) for i, row in enumerate(diverse(results, 3))]
    if args.name:
        if len(chosen) != 1:
            from compsearch.errors import ConfigError

            raise ConfigError(f"--name: expected one rule to name, but {len(chosen)} were given.")
        chosen = [(args.name, chosen[0][1])]
    return chosen


def run(args: argparse.Namespace) -> int:
    folder = StudyFolder(Path(args.study))
    study = open_study(folder.frozen(), folder)
    results = load_results(study)
    chosen = choose(args, results)
    recipes = [(name, row, recipe_of(folder, row, results, study)) for name, row in chosen]
    for name, row, recipe in recipes:
        path = write_recipe(recipe, folder.path / "recipes" / f"{name}.yaml")
        m = row.measured
        print(f"{path}: trial {row.number}, {results.metric} {m.get(results.metric, float('nan')):.4f}, "
              f"latency {m.get('latency_ms', float('nan')):.3f} ms, size {m.get('size_bytes', 0):,.0f} B")  # fmt: skip
    return 0
