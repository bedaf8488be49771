"""``compsearch recipe check FILE [--task T]``: parse a recipe, and check it against a task's model."""

from __future__ import annotations

import argparse

from compsearch.recipes import read_recipe, validate


def add_parser(commands) -> None:
    parser = commands.add_parser("recipe", help="work with recipe files")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="parse a recipe and check it against a task's model")
    check.add_argument("file")
    check.add_argument("--task", help="check layer names and fingerprint against this task")
    check.add_argument("--trust-task", action="store_true",
                       help="import or fetch the task the recipe names (plug-ins, hf:)")  # fmt: skip
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    from compsearch.final import task_for

    recipe = read_recipe(args.file)
    task_name = args.task or recipe.provenance.task
    if task_name:
        validate(recipe, task_for(recipe, args.task, args.trust_task).teacher())
        print(f"{args.file}: valid for task {task_name!r} ({len(recipe.layers)} layer keys)")
    else:
        print(
            f"{args.file}: valid recipe ({len(recipe.layers)} layer keys); no task to check against"
        )
    return 0
