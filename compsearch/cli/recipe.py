"""``compsearch recipe check FILE [--task T]``: parse a recipe, and check it against a task's model."""

from __future__ import annotations

import argparse

from compsearch.paths import runs_root
from compsearch.recipes import read_recipe, validate
from compsearch.tasks import get_task


def add_parser(commands) -> None:
    parser = commands.add_parser("recipe", help="work with recipe files")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="parse a recipe and check it against a task's model")
    check.add_argument("file")
    check.add_argument("--task", help="check layer names and fingerprint against this task")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    recipe = read_recipe(args.file)
    task_name = args.task or recipe.provenance.task
    if task_name:
        validate(recipe, get_task(task_name, runs_root=runs_root()).teacher())
        print(f"{args.file}: valid for task {task_name!r} ({len(recipe.layers)} layer keys)")
    else:
        print(
            f"{args.file}: valid recipe ({len(recipe.layers)} layer keys); no task to check against"
        )
    return 0
