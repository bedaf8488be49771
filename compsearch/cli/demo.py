"""``compsearch demo``: the main job on the embedded default.

Until the search driver lands this builds every built-in task's teacher (training and caching the
ones that need it) and evaluates it on its held-out data.
"""

from __future__ import annotations

import argparse
import time

from compsearch.errors import TaskError
from compsearch.paths import runs_root
from compsearch.tasks import BUILTINS, get_task


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="run the end-to-end demo on the built-in tasks")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    root = runs_root()
    print(f"runs root: {root.resolve()}")
    for name in BUILTINS:
        started = time.perf_counter()
        try:
            task = get_task(name, runs_root=root)
        except TaskError as error:
            print(f"{name}: skipped ({error})")
            continue
        model = task.teacher()
        metrics = task.evaluate(model)
        params = sum(p.numel() for p in model.parameters())
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"{name}: {params:,} parameters; {shown} ({time.perf_counter() - started:.1f} s)")
    return 0
