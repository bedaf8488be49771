"""Shipped speed and size: each built-in task's teacher against the final trained model of a recipe.

For each task, the recipe is the knee of its study's front (``runs/<task>/recipes/knee.yaml``;
with ``--search`` the study in ``configs/<task>.yaml`` is run and exported first), trained with the
study's ``final.steps`` by ``compsearch train``'s code path. ``smollm`` gets a post-training recipe
(int8 weights and per-token int8 activations on its linear layers, no fine-tuning: a fine-tune of a
135M model does not fit this benchmark on two CPU cores). Measured on the CPU with 2 threads: the task's
metric on the test split (the search chose the recipe on the validation split, shown beside it),
the artifact's file size and latency — beside the source article's headline (1/8 of the size, 5–7×
faster, ≤ 3 % accuracy drop) and beside PyTorch's one-line dynamic int8 (``quantize_dynamic`` on the
Linear layers, test split), measured in the same run. The ``smollm`` teacher is the package's
Q4_1 GGUF upcast to float32 (see README): ratios are against that float model.
Run: python benchmarks/deploy.py [--tasks digits mnist minilm vlm-mnist smollm] [--search]
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import torch
from _common import header, median_ms, table
from torch import nn

from compsearch.final import train_recipe
from compsearch.paths import runs_root
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe, write_recipe
from compsearch.tasks import get_task, move

ROOT = Path(__file__).resolve().parents[1]
#: the knee goals per task: at most this relative drop, at least 5x faster and 8x smaller
GOALS = {"minilm": 0.03, "mnist": 0.01}
FASTER, SMALLER = 5.0, 8.0


def recipe_for(task: str, search: bool) -> Path:
    if task == "smollm":
        recipe = Recipe(
            layers={"re:model\\.layers\\..*": LayerPlan(w_bits=8, a_bits=8)},
            finetune=FinetuneBudget(steps=0),
            calibration=CalibrationPlan(batches=2, activation_mode="dynamic"),
        )
        from dataclasses import replace

        recipe = replace(recipe, provenance=replace(recipe.provenance, task="smollm"))
        return write_recipe(recipe, runs_root() / "smollm-ptq.yaml")
    knee = runs_root() / task / "recipes" / "knee.yaml"
    if search or not knee.exists():
        from compsearch.cli import main

        for command in (["search", str(ROOT / "configs" / f"{task}.yaml")],
                        ["export", str(runs_root() / task), "--knee"]):  # fmt: skip
            if main(command) != 0:
                raise SystemExit(f"`compsearch {' '.join(command)}` failed; see its message above")
    return knee


def dynamic_int8(task_name: str) -> tuple[float, float, float] | None:
    """PyTorch's one-line dynamic int8: (metric, size ratio, speed-up) vs the same teacher."""
    task = get_task(task_name)
    teacher = task.teacher()
    if not any(isinstance(m, nn.Linear) for m in teacher.modules()):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(teacher, {nn.Linear}, dtype=torch.qint8)
    sizes = []
    for model in (teacher, quantized):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        sizes.append(buffer.tell())
    batch = move(task.example_inputs(), "cpu")
    with torch.inference_mode():
        times = [median_ms(lambda m=m: task.forward(m, batch), 15) for m in (teacher, quantized)]
    metric = task.evaluate(quantized, "test")[task.primary_metric]
    return metric, sizes[0] / sizes[1], times[0] / times[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "minilm", "vlm-mnist",
                                                       "smollm"])  # fmt: skip
    parser.add_argument("--search", action="store_true", help="run each study's search first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, baselines, goals = [], [], []
    for task in args.tasks:
        path = recipe_for(task, args.search)
        run = train_recipe(path, steps=None if task == "smollm" else _final_steps(task),
                           name=f"deploy-{task}")  # fmt: skip
        t, c = run.measurements.teacher, run.measurements.compressed
        metric = get_task(task).primary_metric
        valid = f"{metric}_validation"
        rows.append([task, metric, f"{t[metric]:.4f}", f"{c[metric]:.4f}",
                     f"{c.get(metric + '_drop_rel', 0) * 100:+.2f}%",
                     f"{t[valid]:.4f} → {c[valid]:.4f}",
                     f"{t['size_bytes'] / c['size_bytes']:.2f}×",
                     f"{c['speedup']:.2f}×",  # the paired ratio: both timed in the same runs
                     f"{t['latency_ms']:.1f} → {c['latency_ms']:.1f}"])  # fmt: skip
        if task in GOALS:
            drop = c.get(metric + "_drop_rel", 0.0)
            goals.append(_goal_row(task, "knee, final run (test)", drop, c["speedup"],
                                   t["size_bytes"] / c["size_bytes"]))  # fmt: skip
            goals += _front_rows(task)
        dynamic = dynamic_int8(task)
        if dynamic is not None:
            value, size_ratio, speedup = dynamic
            baselines.append([task, f"{t[metric]:.4f} → {value:.4f}", f"{size_ratio:.2f}×",
                              f"{speedup:.2f}×"])  # fmt: skip
    header("Shipped speed and size: teacher vs the final trained model (CPU, 2 threads)")
    table(["task", "metric", "teacher (test)", "compressed (test)", "relative drop (test)",
           "validation", "smaller (file bytes)", "faster", "latency ms"], rows)  # fmt: skip
    print("Source article's headline: 1/8 of the size (8×), 5–7× faster, accuracy drop ≤ 3 %.\n")
    print("PyTorch's one-line dynamic int8 (`quantize_dynamic` on Linear layers), same teachers:\n")
    table(["task", "metric (teacher → int8)", "smaller", "faster"], baselines)
    if goals:
        print(f"Knee goals: ≥ {FASTER:g}× faster and ≥ {SMALLER:g}× smaller at a drop within the "
              "task's goal; the knee after its final run, then every point of the study's front "
              "as its trial measured it (validation split):\n")  # fmt: skip
        table(["task", "point", "drop", "faster", "smaller", "stopped by"], goals)


def _goal_row(task: str, point: str, drop: float, faster: float, smaller: float) -> list[str]:
    missed = [f"drop {drop * 100:+.2f} % > {GOALS[task] * 100:g} %"] if drop > GOALS[task] else []
    missed += [f"{faster:.2f}× < {FASTER:g}× faster"] if faster < FASTER else []
    missed += [f"{smaller:.2f}× < {SMALLER:g}× smaller"] if smaller < SMALLER else []
    return [task, point, f"{drop * 100:+.2f} %", f"{faster:.2f}×", f"{smaller:.2f}×",
            "; ".join(missed) or "meets every goal"]  # fmt: skip


def _front_rows(task: str) -> list[list[str]]:
    """The study's front, point by point, with what each trial measured (latency as the trial
    recorded it: measured, or the latency table's prediction where the row says so)."""
    from compsearch.search import folder_for, load_results, read_config
    from compsearch.search.study import open_study

    config = read_config(ROOT / "configs" / f"{task}.yaml")
    results = load_results(open_study(config, folder_for(config, runs_root())))
    teacher = results.teacher[results.metric]
    out = []
    for row in sorted(results.front(), key=lambda r: -r.measured.get("speedup", 0)):
        value = row.measured[results.metric]
        drop = (teacher - value) / teacher if results.direction == "maximize" else (
            (value - teacher) / teacher)  # fmt: skip
        source = row.measured.get("latency_source", "measured")
        out.append(_goal_row(task, f"front trial {row.number} (latency {source})", drop,
                             row.measured["speedup"], row.measured["size_ratio"]))  # fmt: skip
    return out


def _final_steps(task: str) -> int:
    from compsearch.search import read_config

    return read_config(ROOT / "configs" / f"{task}.yaml").final.steps


if __name__ == "__main__":
    main()
