"""``compsearch demo``: the main job on the embedded default — a real search on ``mnist``.

Runs ``configs/mnist.yaml`` (found beside the current directory, as in a checkout) with the embedded
SQLite storage, then prints the front and where its files are. ``make demo`` runs the same search.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compsearch.errors import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="run the demo search (configs/mnist.yaml)")
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compsearch.cli import search

    if not Path(args.config).is_file():
        raise ConfigError(
            f"demo: expected the demo config at {args.config!r}, but it is not there. Run the demo "
            "from a checkout of compsearch, or pass --config PATH."
        )
    return search.search_and_show(args.config)
