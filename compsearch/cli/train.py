"""``compsearch train RECIPE``: the final full training run, into the artifact that ships.

``--from-study runs/<study> --top-k K`` trains the K most accurate exported points of a study (it
exports the defaults first if nothing was exported) and reports which is best after full training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from compsearch.errors import ConfigError
from compsearch.final import best_of, task_for, train_recipe
from compsearch.paths import runs_root
from compsearch.recipes import Recipe, read_recipe
from compsearch.search.export import export_recipes, rank_exported
from compsearch.search.study import StudyFolder, recipe_study


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a recipe with the full budget")
    parser.add_argument("recipe", nargs="?", help="a recipe file")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="fine-tune steps (default: the study's final.steps"
                                                  " or the recipe's)")  # fmt: skip
    budget.add_argument("--epochs", type=float, help="fine-tune epochs over the training data")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--name", help="artifact folder name (default: the recipe's file name)")
    parser.add_argument("--task", help="override the recipe's task")
    parser.add_argument("--trust-task", action="store_true",
                        help="import or fetch the task the file names (plug-ins, hf:)")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--one-block-at-a-time", action="store_true",
                        help="calibration-only recipes: read and calibrate one block at a time "
                             "from the model's file (the same artifact, a fraction of the "
                             "memory)")  # fmt: skip
    parser.add_argument("--from-study", help="train exported recipes of this study folder")
    parser.add_argument("--top-k", type=int, default=1)
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class StudySettings:
    """What the recipe's study (if it is in this runs root) says about its final run."""

    steps: int | None
    checkpoint_every: int
    bounds: tuple = ()
    device: str = "cpu"
    threads: int = 2
    trust_task: bool = False
    runtime: str = "torch"


def study_settings(recipe: Recipe, args: argparse.Namespace) -> StudySettings:
    """The final-run settings of the recipe's study; a task the user's own study names is trusted."""
    config = recipe_study(recipe, runs_root())
    trust = getattr(args, "trust_task", False)
    if config is None:
        return StudySettings(args.steps, args.checkpoint_every or 100, trust_task=trust)
    return StudySettings(
        args.steps if args.steps is not None else config.final.steps,
        args.checkpoint_every or config.final.checkpoint_every,
        config.constraints, config.device, config.latency.threads,
        trust or config.task == recipe.provenance.task, config.latency.runtime,
    )  # fmt: skip


def train_one(path: Path, args, name: str | None = None):
    settings = study_settings(read_recipe(path), args)
    steps = None if args.epochs is not None else settings.steps
    run = train_recipe(path, steps, args.epochs, name or args.name, args.resume, args.task,
                       settings.checkpoint_every, trust_task=settings.trust_task,
                       bounds=settings.bounds, device=settings.device,
                       threads=settings.threads, runtime=settings.runtime,
                       one_block_at_a_time=getattr(args, "one_block_at_a_time", False))  # fmt: skip
    print(f"{run.path}: report {run.path / 'report.md'}")
    print((run.path / "report.md").read_text())
    return run.path, run.measurements


def check_args(args: argparse.Namespace) -> None:
    """Every number is checked before any work starts."""
    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected a count of at least 1, but got {args.top_k}.")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(
            f"--checkpoint-every: expected a step count of at least 1, but got "
            f"{args.checkpoint_every}. Leave it out for the study's final.checkpoint_every."
        )
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps: expected a step count of at least 0, but got {args.steps}.")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError(f"--epochs: expected a number above 0, but got {args.epochs}.")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.from_study:
        return from_study(args)
    if not args.recipe:
        raise ConfigError("train: expected a recipe file or --from-study runs/<study>.")
    train_one(Path(args.recipe), args)
    return 0


def from_study(args: argparse.Namespace) -> int:
    folder = Path(args.from_study)
    study = StudyFolder(folder)
    config = study.frozen()
    if not sorted((folder / "recipes").glob("*.yaml")):
        export_recipes(study)  # the default rules: knee, most accurate, diverse
    recipes = {path: read_recipe(path) for path in sorted((folder / "recipes").glob("*.yaml"))}
    first = next(iter(recipes.values()))
    task = task_for(first, args.task, study_settings(first, args).trust_task)
    metric = task.primary_metric
    ranked = rank_exported(recipes, metric, task.direction)
    if len(ranked) < args.top_k:
        print(f"note: --top-k {args.top_k}, but the study has {len(ranked)} distinct exported "
              f"point{'s' if len(ranked) != 1 else ''}; training {len(ranked)}. Export more with "
              f"'compsearch export {folder} --diverse K'.")  # fmt: skip
    reports = {}
    for path in ranked[: args.top_k]:
        _, measured = train_one(path, args, name=path.stem)
        reports[path.stem] = measured
    winner = best_of(reports, metric, task.direction)
    print(f"best after full training ({config.study}): {winner} — {metric} "
          f"{reports[winner].compressed[metric]:.4f}, {reports[winner].compressed['speedup']:.2f}× "
          f"faster, {reports[winner].compressed.get('size_ratio', 0):.2f}× smaller")  # fmt: skip
    return 0
