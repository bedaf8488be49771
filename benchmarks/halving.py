"""Multi-objective successive halving: does it find a better front for the same fine-tune budget?

On ``mnist``, the default search (NSGA-II, configs/mnist.yaml's space) with and without halving,
stopped at the same total number of fine-tune steps; hypervolume of the feasible front
(normalized objectives, fixed reference point), 3 seeds, median and spread.
Run: python benchmarks/halving.py [--seeds 3] [--budget 3000]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from _common import header, table

from compsearch.search import folder_for, load_driver, load_results, parse_config
from compsearch.search.study import open_study

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"


def run(
    halving: bool, seed: int, budget: int, root: Path, min_steps: int
) -> tuple[float, int, int]:
    raw = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    raw["study"] = f"halving-{halving}-{seed}"
    raw["search"].update({"seed": seed, "trials": 10_000, "step_budget": budget})
    raw["search"]["halving"] = {"enabled": halving, "eta": 3, "min_steps": min_steps}
    config = parse_config(raw)
    os.environ["COMPSEARCH_RUNS"] = str(root)
    folder = folder_for(config, root)
    load_driver("optuna")(config, folder).run()
    results = load_results(open_study(config, folder))
    counts = results.counts()
    return results.hypervolume(), sum(counts.values()), counts.get("COMPLETE", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=3000, help="total fine-tune steps")
    parser.add_argument("--min-steps", type=int, default=0, help="first rung (0: the default)")
    parser.add_argument("--only-halving", action="store_true", help="skip the baseline search")
    args = parser.parse_args()
    torch.set_num_threads(2)
    header(f"Successive halving on mnist at an equal budget of {args.budget} fine-tune steps")
    rows = []
    teachers = Path(os.environ.get("COMPSEARCH_RUNS", "runs")) / "_teachers"
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        if teachers.exists():  # reuse the trained teacher
            (root / "_teachers").symlink_to(teachers.resolve())
        for halving in (True, False) if not args.only_halving else (True,):
            results = [run(halving, seed, args.budget, root, args.min_steps)
                       for seed in range(args.seeds)]  # fmt: skip
            volumes = [r[0] for r in results]
            rows.append([
                "with halving (eta 3)" if halving else "without halving",
                " / ".join(f"{v:.4f}" for v in volumes), f"{statistics.median(volumes):.4f}",
                f"{max(volumes) - min(volumes):.4f}",
                " / ".join(f"{r[1]} ({r[2]})" for r in results),
            ])  # fmt: skip
    table(["search", "hypervolume per seed", "median", "spread", "trials (completed) per seed"],
          rows)  # fmt: skip


if __name__ == "__main__":
    main()
