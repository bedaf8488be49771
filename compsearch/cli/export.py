"""``compsearch export runs/<study>``: write chosen points of the feasible front as recipe files.

Rules (any combination; none given = the knee, the most accurate point and 3 diverse points):
``--best OBJECTIVE [--where 'latency_ms <= 5' ...]``, ``--knee``, ``--diverse K``. Files go to
``runs/<study>/recipes/<name>.yaml`` with the measured values and provenance; every rule is checked
before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compsearch.objectives.constraints import format_bytes
from compsearch.search import StudyFolder
from compsearch.search.export import export_recipes


def add_parser(commands) -> None:
    parser = commands.add_parser("export", help="export front points as recipes")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.add_argument("--best", metavar="OBJECTIVE", help="accuracy, latency_ms or size_bytes")
    parser.add_argument("--where", action="append", default=[], metavar="BOUND",
                        help="a bound for --best, e.g. 'latency_ms <= 5' (repeatable)")  # fmt: skip
    parser.add_argument("--knee", action="store_true", help="the knee of the front")
    parser.add_argument("--diverse", type=int, metavar="K", help="K points spread over the front")
    parser.add_argument("--name", help="file name for a single exported recipe")
    parser.add_argument("--allow-infeasible", action="store_true",
                        help="no feasible trial: export the 3 closest to the bounds, marked so")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    written = export_recipes(StudyFolder(Path(args.study)), best_of=args.best,
                             where=tuple(args.where), take_knee=args.knee, spread=args.diverse,
                             name=args.name, allow_infeasible=args.allow_infeasible)  # fmt: skip
    for path, row, results in written:
        m = row.measured
        ci = f" ±{m['latency_ci'] * 100:.0f}%" if isinstance(m.get("latency_ci"), float) else ""
        mark = "" if row.feasible else " — INFEASIBLE, breaks the study's bounds (see provenance)"
        print(f"{path}: trial {row.number}, {results.metric} {m.get(results.metric, float('nan')):.4f}, "
              f"latency {m.get('latency_ms', float('nan')):.3f} ms{ci}, "
              f"size {format_bytes(m.get('size_bytes', 0))}{mark}")  # fmt: skip
    return 0
