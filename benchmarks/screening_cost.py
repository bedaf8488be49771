"""What a screened trial costs against a trained one, as the fine-tune grows (mnist).

The same 12 candidates (``configs/mnist.yaml``'s space, random sampler, seed 0, no one-shot plans)
are searched at several fine-tune lengths; candidates whose latency or size breaks a bound are
screened — measured, evaluated zero-shot, recorded, not fine-tuned — and the rest are trained. Per
length: the median wall time of a screened trial and of a trained one (each trial's own
``seconds`` in its metrics.json) and their ratio. Each length is a study under the runs root's
``_benchmarks/screening_cost``; rerunning resumes or reuses them.

Run: python benchmarks/screening_cost.py [--steps 100 1000 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import yaml
from _common import header, results_folder, table

from compsearch.cli import main as cli

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "mnist.yaml")
TRIALS = 12


def study(steps: int) -> str:
    return f"screening-{steps}"


def run(steps: int) -> list[dict]:
    root = results_folder("screening_cost")
    os.environ["COMPSEARCH_RUNS"] = str(root)
    with open(CONFIG) as stream:
        config = yaml.safe_load(stream)
    config["study"] = study(steps)
    config["search"].update({"sampler": "random", "trials": TRIALS, "plans": 0,
                             "finetune_steps": steps, "seed": 0})  # fmt: skip
    path = root / f"{study(steps)}.yaml"
    path.write_text(yaml.safe_dump(config))
    if cli(["search", str(path)]) != 0:
        raise SystemExit(f"the search at {steps} steps failed")
    folder = root / study(steps) / "trials"
    return [json.loads((trial / "metrics.json").read_text())
            for trial in sorted(folder.iterdir()) if (trial / "metrics.json").exists()]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 3000])
    args = parser.parse_args()
    rows = []
    for steps in args.steps:
        trials = run(steps)
        screened = [t["seconds"] for t in trials if t.get("screened")]
        trained = [t["seconds"] for t in trials if not t.get("screened")]
        if not screened or not trained:
            rows.append([steps, len(screened), len(trained), "—", "—", "—"])
            continue
        ratio = statistics.median(screened) / statistics.median(trained)
        rows.append([steps, len(screened), len(trained), f"{statistics.median(screened):.2f}",
                     f"{statistics.median(trained):.2f}", f"{100 * ratio:.1f} %"])  # fmt: skip
    header("Screening cost against fine-tune length (mnist)")
    table(["fine-tune steps", "screened", "trained", "screened trial s (median)",
           "trained trial s (median)", "screened / trained"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
