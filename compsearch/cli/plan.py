"""``compsearch plan CONFIG``: the one-shot recipes, without searching.

Measures (or reads back) the study's sensitivity table, solves the integer program along a ladder
of cost bounds (see compsearch.search.plan), measures each solution's real costs untrained, and
writes the recipes to ``runs/<study>/plans/plan-<n>.yaml`` — ready for ``compsearch train``. A
later ``compsearch search`` on the same config reuses the table.
"""

from __future__ import annotations

import argparse

import optuna

from compsearch._files import write_text_atomic
from compsearch.paths import runs_root
from compsearch.recipes import dumps
from compsearch.recipes.io import HEADER
from compsearch.search import folder_for, read_config
from compsearch.search.plan import ladder
from compsearch.search.prepare import prepare_study
from compsearch.search.sensitivity import COSTS, load_or_measure, reference_params, untrained_costs


def add_parser(commands) -> None:
    parser = commands.add_parser("plan", help="one-shot ILP recipes from sensitivity, no search")
    parser.add_argument("config", help="the study config (YAML)")
    parser.add_argument("--points", type=int, default=None,
                        help="recipes along the cost axis (default: search.plans, or 4)")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    folder = folder_for(config, runs_root())
    folder.check_resume(config)
    ctx, study = prepare_study(config, folder)
    table = load_or_measure(ctx, study, config.search.sensitivity_batches)
    reference = reference_params(ctx.space)
    limits = {c.name: c.absolute(ctx.teacher) for c in config.constraints if c.name in COSTS}
    points = args.points if args.points is not None else (config.search.plans or 4)
    plans = ladder(table, limits, points, lambda params: untrained_costs(ctx, params), log=print)
    if not plans:
        print(f"no plan: each of the {points} rungs was left out (above); widen the space or "
              "loosen the bounds")  # fmt: skip
        return 1
    for number, plan in enumerate(plans, start=1):
        recipe = ctx.space.suggest(optuna.trial.FixedTrial({**reference, **plan.params}))
        path = folder.path / "plans" / f"plan-{number}.yaml"
        text = dumps(recipe).replace(HEADER, f"{HEADER}# {plan.describe()}\n", 1)
        write_text_atomic(path, text)
        print(f"{path}: {plan.describe()}")
    return 0
