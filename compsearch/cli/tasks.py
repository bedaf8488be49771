"""``compsearch tasks``: list the built-in tasks."""

from __future__ import annotations

import argparse

from compsearch.tasks import BUILTINS


def add_parser(commands) -> None:
    parser = commands.add_parser("tasks", help="list the built-in tasks")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name, target in BUILTINS.items():
        module = target.partition(":")[0]
        import importlib

        doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
    return 0
