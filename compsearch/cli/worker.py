"""``compsearch worker runs/<study>``: join a study from another process or machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from compsearch.search import StudyFolder, load_driver


def add_parser(commands) -> None:
    parser = commands.add_parser("worker", help="run trials of an existing study")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    folder = StudyFolder(Path(args.study))
    config = folder.frozen()
    summary = load_driver("optuna")(config, folder).run()
    print(f"worker stopped: {summary.reason} ({summary.completed} completed, {summary.stopped} "
          f"stopped, {summary.failed} failed here)")  # fmt: skip
    return 1 if summary.short else 0
