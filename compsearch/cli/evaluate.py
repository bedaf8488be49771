"""``compsearch evaluate PATH``: re-measure an artifact and compare it with its teacher."""

from __future__ import annotations

import argparse
import json

from compsearch.final import evaluate


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="measure an artifact against its teacher")
    parser.add_argument("path", help="model.safetensors, or the folder holding it")
    parser.add_argument("--task", help="override the recipe's task")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    measured = evaluate(args.path, args.task, args.device)
    if args.json:
        print(json.dumps(measured.to_dict(), indent=2, sort_keys=True))
        return 0
    t, c = measured.teacher, measured.compressed
    print(f"{'':12s} {'teacher':>14s} {'compressed':>14s}")
    for key in sorted(set(t) & set(c)):
        print(f"{key:12s} {t[key]:14.6g} {c[key]:14.6g}")
    print(f"speed-up {c['speedup']:.2f}×, {c.get('size_ratio', 0):.2f}× smaller")
    for state in measured.constraints.values():
        print(f"constraint {state['limit']}: {'met' if state['met'] else 'NOT met'}")
    return 0
