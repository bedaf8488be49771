"""Trial throughput on ``mnist``: trials per hour and where a trial's time goes.

Runs a search with configs/mnist.yaml's space (halving off, so every trial is a full trial) and
reads each trial's recorded phase times: set-up, prune, quantize, calibrate, fine-tune, deploy (the
pipeline's own timings), measure (latency, size and MACs on the deploy form) and evaluate (accuracy
on the deploy form). Goal: under 20 % of a trial outside fine-tuning.
Run: python benchmarks/throughput.py [--trials 12] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import header, table

from compsearch.search import folder_for, load_driver, parse_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"
PHASES = ("setup", "prune", "quantize", "calibrate", "finetune", "deploy", "measure", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(2)
    raw = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    raw["study"] = "throughput"
    raw["search"].update({"trials": args.trials, "finetune_steps": args.steps, "baselines": False,
                          "halving": {"enabled": False}})  # fmt: skip
    config = parse_config(raw)
    teachers = Path(os.environ.get("COMPSEARCH_RUNS", "runs")) / "_teachers"
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        if teachers.exists():
            (root / "_teachers").symlink_to(teachers.resolve())
        os.environ["COMPSEARCH_RUNS"] = str(root)
        folder = folder_for(config, root)
        started = time.perf_counter()
        load_driver("optuna")(config, folder).run()
        wall = time.perf_counter() - started
        records = [
            json.loads(p.read_text()) for p in sorted(folder.path.glob("trials/*/metrics.json"))
        ]
    header(
        f"Trial throughput on mnist ({args.steps} fine-tune steps per trial, {args.trials} trials)"
    )
    totals = {phase: [r["timings"].get(phase, 0.0) for r in records] for phase in PHASES}
    seconds = [r["seconds"] for r in records]
    rows = []
    for phase in PHASES:
        share = sum(totals[phase]) / sum(seconds)
        rows.append([phase, f"{statistics.median(totals[phase]):.3f}", f"{share * 100:.1f}%"])
    other = sum(seconds) - sum(sum(v) for v in totals.values())
    rows.append(["other (suggest, files, storage)", f"{other / len(records):.3f}",
                 f"{other / sum(seconds) * 100:.1f}%"])  # fmt: skip
    table(["phase", "median seconds per trial", "share of trial time"], rows)
    outside = 1 - sum(totals["finetune"]) / sum(seconds)
    print(f"Trials per hour: {len(records) / wall * 3600:.0f} (wall {wall:.0f} s for "
          f"{len(records)} trials, including the study's one-time set-up). Median trial "
          f"{statistics.median(seconds):.2f} s; {outside * 100:.1f}% of trial time is outside "
          "fine-tuning.\n")  # fmt: skip


if __name__ == "__main__":
    main()
