"""``compsearch teacher TASK``: build (and, where needed, train and cache) a task's teacher, then
evaluate it."""

from __future__ import annotations

import argparse
import json
import time

from compsearch.paths import runs_root
from compsearch.tasks import get_task


def add_parser(commands) -> None:
    parser = commands.add_parser("teacher", help="build and evaluate a task's teacher")
    parser.add_argument("task", help="built-in task name or module.path:factory")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    task = get_task(args.task, runs_root=runs_root())
    model = task.teacher()
    metrics = task.evaluate(model)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    params = sum(p.numel() for p in model.parameters())
    print(f"{task.name}: {params:,} parameters, {time.perf_counter() - started:.1f} s")
    for name, value in metrics.items():
        marker = " (primary)" if name == task.primary_metric else ""
        print(f"  {name:24s} {value:.4f}{marker}")
    return 0
