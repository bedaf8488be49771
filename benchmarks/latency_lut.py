"""How well does the latency lookup table predict measured latency?

On ``mnist`` and ``minilm``: 20 random recipes from the default search space (depth pruning on),
each compressed (no fine-tuning: latency does not depend on trained weights) and deployed; the
table's prediction beside the end-to-end measurement (CPU, 2 threads). Reports the median absolute
relative error and the Spearman rank correlation.
Run: python benchmarks/latency_lut.py [--recipes 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna
import torch
from _common import header, table
from scipy.stats import spearmanr

from compsearch.kernels.deploy import to_deploy
from compsearch.objectives import LatencyTable, measure_latency
from compsearch.pipeline import compress
from compsearch.spaces import Space, discover, parse_space
from compsearch.tasks import get_task


def evaluate(name: str, recipes: int, directory: Path) -> list[object]:
    task = get_task(name)
    teacher = task.teacher()
    example = task.calibration_batches(1)[0]
    shipped, _ = to_deploy(teacher, run=lambda m: task.forward(m, example))
    table_ = LatencyTable(directory / f"{name}.json")
    reference = statistics.median(measure_latency(shipped, task).median_ms for _ in range(3))
    table_.calibrate(shipped, task, reference)
    space = Space.build(parse_space({"depth": True}), discover(task), name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    measured, predicted = [], []
    for _ in range(recipes):
        trial = study.ask()
        deployed = compress(task, space.suggest(trial), steps=0).deployed
        measured.append(measure_latency(deployed, task, repeats=30).median_ms)
        predicted.append(table_.predict(deployed, task))
        study.tell(trial, 0.0)
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    rho = spearmanr(predicted, measured).statistic
    return [name, recipes, f"{min(measured):.1f}–{max(measured):.1f}",
            f"{statistics.median(errors) * 100:.1f}%", f"{max(errors) * 100:.1f}%", f"{rho:.3f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header("Latency lookup table vs end-to-end measurement (CPU, 2 threads)")
    with tempfile.TemporaryDirectory() as directory:
        rows = [evaluate(name, args.recipes, Path(directory)) for name in ("mnist", "minilm")]
    table(["task", "random recipes", "measured range (ms)", "median abs error", "max error",
           "Spearman"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
