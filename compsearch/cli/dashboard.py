"""``compsearch dashboard runs/<study>``: optuna-dashboard on the study's own storage.

optuna-dashboard reads a compsearch study as it is (metric names, constraints, intermediate values,
the trials' attributes); this command finds the storage for you and makes one thing right that the
dashboard does not do by itself: its "best trials" of a multi-objective study are the Pareto front of
*every* completed trial, feasible or not. Here they are the front of the feasible trials — the ones
``compsearch pareto`` shows. Install with ``pip install 'compsearch[dashboard]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compsearch.errors import ConfigError
from compsearch.search import StudyFolder
from compsearch.search.storage import open_storage


def add_parser(commands) -> None:
    parser = commands.add_parser("dashboard", help="optuna-dashboard on a study's storage")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.set_defaults(handler=run)


def feasible(trial) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


def constraint_aware(app_module) -> bool:
    """Make the dashboard's best trials the front of the feasible trials; False (and nothing
    changed) where this optuna-dashboard has no such function to wrap."""
    front = getattr(app_module, "get_pareto_front_trials", None)
    if front is None or getattr(front, "_compsearch", False):
        return front is not None

    def feasible_front(trials, directions):
        return front([t for t in trials if feasible(t)], directions)

    feasible_front._compsearch = True  # type: ignore[attr-defined]
    app_module.get_pareto_front_trials = feasible_front
    return True


def run(args: argparse.Namespace) -> int:
    try:
        import optuna_dashboard
        from optuna_dashboard import _app
    except ImportError:
        raise ConfigError(
            "dashboard: expected the optuna-dashboard package, but it is not installed. Install "
            "it with: pip install 'compsearch[dashboard]'."
        ) from None
    folder = StudyFolder(Path(args.study))
    config = folder.frozen()
    if not constraint_aware(_app):
        print("note: this optuna-dashboard marks infeasible trials as best trials too; "
              "`compsearch pareto` shows the feasible front")  # fmt: skip
    print(f"study {config.study}: http://{args.host}:{args.port}/dashboard/ (Ctrl-C stops)")
    optuna_dashboard.run_server(open_storage(config.search.storage, folder.path), host=args.host,
                                port=args.port)  # fmt: skip
    return 0
