"""``compsearch evaluate PATH``: re-measure an artifact and compare it with its teacher."""

from __future__ import annotations

import argparse
import json

from compsearch.final import artifact_recipe, evaluate
from compsearch.paths import runs_root
from compsearch.search.study import recipe_study


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="measure an artifact against its teacher")
    parser.add_argument("path", help="model.safetensors, or the folder holding it")
    parser.add_argument("--task", help="override the recipe's task")
    parser.add_argument("--trust-task", action="store_true",
                        help="import or fetch the task the file names (plug-ins, hf:)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from compsearch.errors import ConfigError

            raise ConfigError(
                "--device: expected a CUDA device for 'cuda', but torch sees none. Run on a CUDA "
                "machine, or leave --device out to measure on the CPU."
            )
    recipe = artifact_recipe(args.path)
    config = recipe_study(recipe, runs_root())  # the user's own study: its task and bounds
    trust = args.trust_task or (config is not None and config.task == recipe.provenance.task)
    bounds, threads = (config.constraints, config.latency.threads) if config else ((), 2)
    runtime = config.latency.runtime if config else "torch"
    measured = evaluate(args.path, args.task, args.device, trust, bounds, threads, runtime)
    if args.json:
        print(json.dumps(measured.to_dict(), indent=2, sort_keys=True))
        return 0
    t, c = measured.teacher, measured.compressed
    print("accuracy on the test split (validation beside it); size is the file's bytes")
    width = max(len(key) for key in set(t) & set(c))
    print(f"{'':{width}s} {'teacher':>14s} {'compressed':>14s}")
    for key in sorted(k for k in set(t) & set(c) if not isinstance(c[k], str)):
        print(f"{key:{width}s} {t[key]:14.6g} {c[key]:14.6g}")
    print(f"speed-up {c['speedup']:.2f}×, {c.get('size_ratio', 0):.2f}× smaller")
    for state in measured.constraints.values():
        print(f"constraint {state['limit']}: {'met' if state['met'] else 'NOT met'}")
    return 0
