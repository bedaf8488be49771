"""Distillation on the shared path: does it recover accuracy, and what does the teacher cache save?

1. ``mnist``: 4-bit weights and keep ratio 0.5 on every prunable group, a 300-step fine-tune, with
   and without distillation (alpha 0.7, T = 4, vs alpha 0), 3 seeds each; accuracy on the test
   split. A 300-step run streams teacher outputs over the training data (``TeacherStream``), as
   the final run does.
2. Trial time with the study's teacher cache (teacher outputs computed once, read by every trial)
   vs a trial that recomputes the teacher's outputs at every step, on ``mnist`` and ``minilm``.
Run: python benchmarks/distill.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import header, table

from compsearch.kernels.distill import TeacherOutputs
from compsearch.kernels.prune import analyze
from compsearch.pipeline import compress
from compsearch.recipes import DistillPlan, FinetuneBudget, LayerPlan, Recipe
from compsearch.tasks import get_task
from compsearch.tasks.teacher_outputs import CacheSpec, TeacherCache


def half_width_4_bit(task) -> dict:
    example = task.calibration_batches(1)[0]
    groups = analyze(task.teacher(), lambda m: task.forward(m, example)).groups
    layers = {g.name: LayerPlan(keep_ratio=0.5) for g in groups.values() if g.prunable}
    layers["re:.*"] = LayerPlan(w_bits=4)
    return layers


def accuracy_rows(seeds: int) -> list[list[object]]:
    task = get_task("mnist")
    teacher = task.evaluate(task.teacher(), "test")["accuracy"]
    layers = half_width_4_bit(task)
    rows = [["teacher (fp32)", "", f"{teacher:.3f}", "", ""]]
    for label, distill in (
        ("distillation, alpha 0.7, T 4", DistillPlan(alpha=0.7, temperature=4.0)),
        ("no distillation, alpha 0", DistillPlan(alpha=0.0)),
    ):
        accuracies = []
        for seed in range(seeds):
            recipe = Recipe(layers=layers, distill=distill,
                            finetune=FinetuneBudget(steps=300, lr=5e-3, seed=seed))  # fmt: skip
            accuracies.append(task.evaluate(compress(task, recipe).deployed, "test")["accuracy"])
        median = statistics.median(accuracies)
        rows.append([label, " / ".join(f"{a:.3f}" for a in accuracies), f"{median:.3f}",
                     f"{(teacher - median) * 100:+.2f}", f"{max(accuracies) - min(accuracies):.3f}"])  # fmt: skip
    return rows


class RecomputingCache(TeacherCache):
    """The design the cache replaces: run the teacher for every training step."""

    def __init__(self, task, spec):
        super().__init__(task, spec)
        self.teacher = task.teacher()

    def get(self, index, device="cpu"):
        batch = self.batches[index % len(self.batches)]
        with torch.no_grad():
            result = self.task.forward(self.teacher, batch)
        self.teacher_runs += 1
        kind = "logits" if result.logits is not None else "embedding"
        return batch, TeacherOutputs(result.main, kind, {}, None)


def cache_rows(steps: int) -> list[list[object]]:
    rows = []
    for name in ("mnist", "minilm"):
        task = get_task(name)
        spec = CacheSpec(batches=64, batch_size=task.default_batch_size)
        shared = TeacherCache(task, spec)
        shared.get(0)  # computed once for the study, before the trials
        compressed = half_width_4_bit(task)
        for label, layers in (("w8, unpruned", {"re:.*": LayerPlan(w_bits=8)}),
                              ("w4, keep 0.5", compressed)):  # fmt: skip
            recipe = Recipe(layers=layers, finetune=FinetuneBudget(steps=steps, lr=1e-4))
            compress(task, recipe, cache=shared, steps=2)  # warm-up: first-call costs
            recomputing = RecomputingCache(task, spec)
            timings = {"cache": [], "recompute": []}
            for _ in range(2):  # alternate the two, median of the pair
                for mode, cache in (("cache", shared), ("recompute", recomputing)):
                    started = time.perf_counter()
                    compress(task, recipe, cache=cache)
                    timings[mode].append(time.perf_counter() - started)
            timings = {mode: statistics.median(times) for mode, times in timings.items()}
            rows.append([name, label, steps, f"{timings['cache']:.1f}", f"{timings['recompute']:.1f}",
                         f"{timings['recompute'] / timings['cache']:.2f}×"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    header("Distillation on mnist: 4-bit weights, keep 0.5 everywhere, 300 fine-tune steps")
    table(["variant", "accuracy per seed", "median", "drop vs teacher (points)", "spread"],
          accuracy_rows(args.seeds))  # fmt: skip
    print("Teacher cache: one trial (w8 everywhere, fine-tune only), seconds:\n")
    table(["task", "recipe", "steps", "with the study cache", "recomputing the teacher",
           "speed-up"], cache_rows(args.steps))  # fmt: skip


if __name__ == "__main__":
    main()
