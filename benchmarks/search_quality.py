"""Search quality: the default search against random search, uniform baselines and single knobs.

At an equal budget (the same number of trials, the same fine-tune steps per trial, halving off so
that budgets are exactly equal), the hypervolume of the feasible front (normalized objectives, fixed
reference point; see compsearch.search.pareto), over seeds, median and spread, for:

* the default search as shipped: the three uniform baselines enqueued first, then the config's
  sampler over the joint space, all inside the same trial budget;
* the default search without the baselines (the sampler alone);
* random search over the same space;
* the uniform baselines (int8 everywhere; 4-bit weights everywhere; keep 0.5 + int8), each a
  single point, measured by the same trial function;
* single-knob searches: bits only (no pruning), pruning only (no quantization), distillation fixed.

Also writes ``hypervolume_vs_trials_<task>.png``: the hypervolume after each trial.
Every search is a study under ``--root`` (default ``runs/_benchmarks/search_quality``): rerunning
the script resumes unfinished studies and reuses finished ones, so the table can be completed over
several sittings (delete the folder to measure afresh).
Run: python benchmarks/search_quality.py [--tasks mnist minilm] [--seeds 3] [--trials 24]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
from pathlib import Path

import torch
import yaml
from _common import header, table

from compsearch.search import folder_for, load_driver, load_results, parse_config
from compsearch.search.prepare import BASELINES, prepare_study
from compsearch.search.study import open_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {  # per task: trials and fine-tune steps at the equal budget
    "mnist": {"trials": 24, "steps": 100},
    "minilm": {"trials": 8, "steps": 10},
}
SHIPPED = "default search, as shipped"  # the three uniform baselines first, inside the same budget
LATENCY_SLACK = 0.05  # a front point within 5 % of a baseline's latency counts as no slower (noise)
# sizes are file bytes, and a recipe's provenance (study name, trial number) rides in the file: the
# same recipe exported from two studies differs by a few bytes, not by compression
SIZE_SLACK = 0.001


def variants(raw: dict) -> dict[str, dict]:
    """Config changes that make each compared search."""
    space = raw.get("space", {})
    fixed_distill = {"alpha": 0.5, "temperature": 2.0}
    return {
        SHIPPED: {"search": {"baselines": True}},
        "default search": {},
        "random search": {"search": {"sampler": "random"}},
        "bits only": {"space": {"keep_ratio": 1.0, "depth": False}},
        "pruning only": {"space": {"w_bits": [16], "a_bits": [16]}},
        "distillation fixed": {"space": {"distill": {**space.get("distill", {}), **fixed_distill}}},
    }


def merged(raw: dict, change: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in change.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def run(raw: dict, root: Path, fronts: list | None = None) -> list[float]:
    config = parse_config(raw)
    folder = folder_for(config, root)
    load_driver("optuna")(config, folder).run()
    results = load_results(open_study(config, folder))
    if fronts is not None:
        fronts.append([results.point(r) for r in results.front()])
    done = [r for r in results.rows if r.state == "COMPLETE"]
    curve = []
    for count in range(1, len(results.rows) + 1):
        seen = [r for r in done if r.number < count]
        front_of = copy.copy(results)
        front_of.rows = seen
        curve.append(front_of.hypervolume())
    return curve


def evaluate_task(task: str, seeds: int, trials: int | None, root: Path, plots: Path):
    raw = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    setting = SETTINGS[task]
    trials = trials or setting["trials"]
    raw["search"].update({"trials": trials, "finetune_steps": setting["steps"], "baselines": False,
                          "halving": {"enabled": False}})  # fmt: skip
    rows, curves, default_fronts = [], {}, []
    for label, change in variants(raw).items():
        volumes = []
        for seed in range(seeds):
            config = merged(raw, change)
            config["study"] = f"{task}-{re.sub(r'[^A-Za-z0-9]+', '-', label)}-{seed}"
            config["search"] = {**config["search"], "seed": seed}
            curve = run(config, root, default_fronts if label == SHIPPED else None)
            curves.setdefault(label, []).append(curve)
            volumes.append(curve[-1])
        rows.append([task, label, " / ".join(f"{v:.4f}" for v in volumes),
                     f"{statistics.median(volumes):.4f}", f"{max(volumes) - min(volumes):.4f}"])  # fmt: skip
    for label, fmt, keep in BASELINES:  # one enqueued trial each, through the same trial function
        config = copy.deepcopy(raw)
        config["study"] = f"{task}-baseline-{fmt}-{keep}"
        config["search"] = {**config["search"], "trials": 1, "baselines": False}
        single = parse_config(config)
        folder = folder_for(single, root)
        ctx, study = prepare_study(single, folder)
        if not study.trials:
            study.enqueue_trial(ctx.space.uniform_params(fmt, keep), user_attrs={"baseline": label})
        load_driver("optuna")(single, folder).run()
        results = load_results(open_study(single, folder))
        row = results.rows[0]
        feasible = "feasible" if row.feasible else "infeasible"
        point = results.point(row)
        relative = {"latency_ms": LATENCY_SLACK, "size_bytes": SIZE_SLACK}
        slack = [relative.get(o, 0.0) * v for o, v in zip(results.objectives, point, strict=True)]
        beaten = sum(any(all(a <= b + e for a, b, e in zip(p, point, slack, strict=True))
                         for p in front) for front in default_fronts)  # fmt: skip
        rows.append([task, f"baseline: {label}", f"{results.hypervolume():.4f} ({feasible}; "
                     f"matched or dominated by the as-shipped front in {beaten}/"
                     f"{len(default_fronts)} seeds)",
                     f"{results.hypervolume():.4f}", "-"])  # fmt: skip
    _plot(task, curves, plots / f"hypervolume_vs_trials_{task}.png")
    return rows


def _plot(task: str, curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        length = min(len(c) for c in runs)
        median = [statistics.median(c[i] for c in runs) for i in range(length)]
        axes.plot(range(1, length + 1), median, label=label)
    axes.set_xlabel("trials")
    axes.set_ylabel("hypervolume of the feasible front (median over seeds)")
    axes.set_title(f"{task}: search quality at an equal budget")
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["mnist", "minilm"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None,
                        help="where the studies live (default: runs/_benchmarks/search_quality)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    header("Search quality at an equal budget (hypervolume of the feasible front)")
    plots = Path(__file__).resolve().parent
    runs = Path(os.environ.get("COMPSEARCH_RUNS", "runs"))
    root = args.root or runs / "_benchmarks" / "search_quality"
    root.mkdir(parents=True, exist_ok=True)
    if (runs / "_teachers").exists() and not (root / "_teachers").exists():
        (root / "_teachers").symlink_to((runs / "_teachers").resolve())
    os.environ["COMPSEARCH_RUNS"] = str(root)
    rows = []
    for task in args.tasks:
        rows += evaluate_task(task, args.seeds, args.trials, root, plots)
    table(["task", "search", "hypervolume per seed", "median", "spread"], rows)
    for task in args.tasks:
        print(f"![hypervolume vs trials, {task}](hypervolume_vs_trials_{task}.png)\n")


if __name__ == "__main__":
    main()
