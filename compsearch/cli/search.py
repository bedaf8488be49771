"""``compsearch search CONFIG``: run (or resume) a study; ``--driver`` picks Optuna or Ray."""

from __future__ import annotations

import argparse
import copy

from compsearch.paths import runs_root
from compsearch.search import folder_for, load_driver, parse_config, read_config


def add_parser(commands) -> None:
    parser = commands.add_parser("search", help="run or resume a compression search")
    parser.add_argument("config", help="study config (YAML); see configs/")
    parser.add_argument("--driver", help="override search.driver: optuna, ray or module.path:Class")
    parser.add_argument("--trials", type=int, help="override search.trials")
    parser.add_argument("--time-limit", help="override search.time_limit (e.g. 600, '10m')")
    parser.set_defaults(handler=run)


def with_overrides(config, source: str, driver=None, trials=None, time_limit=None):
    """``config`` with the command line's ``search`` overrides, checked as the file would be."""
    raw = copy.deepcopy(config.raw)
    search = raw.setdefault("search", {})
    if driver:
        search["driver"] = driver
    if trials is not None:  # 0 is refused by the config's own check, not ignored
        search["trials"] = trials
    if time_limit:
        search["time_limit"] = time_limit
    return parse_config(raw, source=source) if raw != config.raw else config


def run(args: argparse.Namespace) -> int:
    config = with_overrides(read_config(args.config), args.config, args.driver, args.trials,
                            args.time_limit)  # fmt: skip
    return search_and_show(args.config, config)


def search_and_show(path: str, config=None) -> int:
    """Run (or resume) the study of the config at ``path``, then show its front."""
    config = config or read_config(path)
    folder = folder_for(config, runs_root())
    changes = folder.check_resume(config)
    driver_class = load_driver(config.search.driver)
    if folder.exists():
        note = f" (changed: {', '.join(k for k, _, _ in changes)})" if changes else ""
        print(f"resuming study {config.study!r} in {folder.path}{note}")
    summary = driver_class(config, folder).run()
    print(f"search stopped: {summary.reason}")
    print(summary.counts())
    if summary.recovered:
        print(f"re-ran trials whose worker had died: {summary.recovered}")
    from compsearch.cli.pareto import show_front

    show_front(folder)
    return 1 if summary.short else 0
