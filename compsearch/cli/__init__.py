"""The ``compsearch`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from compsearch._steps import show_on_stderr
from compsearch.errors import CompsearchError

SUBCOMMANDS = (
    "demo", "search", "worker", "status", "pareto", "export", "export-model", "train", "evaluate",
    "tasks", "teacher", "recipe", "formats", "sensitivity", "plan", "dashboard",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from compsearch import __version__

    parser = argparse.ArgumentParser(
        prog="compsearch",
        description="Search quantization, pruning and distillation against measured accuracy, "
        "latency and size.",
    )
    parser.add_argument("--version", action="version", version=f"compsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"compsearch.cli.{name.replace('-', '_')}")
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    show_on_stderr()
    # plug-ins your config names (a task factory, a data hook) are found in the folder you run
    # compsearch from, as with `python -m`; appended, so nothing there shadows an installed package
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return int(args.handler(args) or 0)
    except CompsearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
