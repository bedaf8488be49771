"""``compsearch demo``: the main job on the embedded default — a real search on ``mnist``.

Runs ``configs/mnist.yaml`` (found beside the current directory, as in a checkout) with the embedded
SQLite storage for at most ``--time-limit`` (8 minutes; the config's 100 trials take about 20 on two
cores), then prints the front and where its files are. Running it again continues the same study.
``make demo`` runs this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compsearch.errors import ConfigError
from compsearch.search import read_config


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="run the demo search (configs/mnist.yaml)")
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--time-limit", default="8m",
                        help="search for at most this long (again: continue); default 8m")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compsearch.cli import search

    if not Path(args.config).is_file():
        raise ConfigError(
            f"demo: expected the demo config at {args.config!r}, but it is not there. Run the demo "
            "from a checkout of compsearch, or pass --config PATH."
        )
    config = search.with_overrides(read_config(args.config), args.config,
                                   time_limit=args.time_limit)  # fmt: skip
    return search.search_and_show(args.config, config)
