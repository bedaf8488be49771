"""PyTorch eager vs ONNX Runtime: the same deploy forms, teacher and compressed, in both runtimes.

For each task, the teacher's deploy form and a compressed one (the recipe below, calibrated, no
fine-tune) are exported to ONNX (``compsearch.exports.onnx``) and loaded in ONNX Runtime sessions
(2 threads, no spinning). The four models are timed interleaved — one forward of each per round,
the order rotated every round — on the task's example inputs, so all four see the same machine
load; the table quotes medians and each runtime's speed-up over the PyTorch teacher. Accuracy is the
task's metric on the test split, from each runtime. ``error`` is the relative output difference
‖ONNX Runtime − PyTorch‖ / ‖PyTorch‖ of the compressed model on the example inputs; ``integer``
counts the quantized layers ONNX Runtime runs on an integer kernel (the rest compute in float).

Recipe: int8 weights (per channel) and static int8 inputs on every layer the space can quantize —
the int8 point every study's space contains — calibrated on 4 batches. Not the studies' knees:
those need searches this benchmark does not run.
Run: python benchmarks/onnx_runtime.py [--tasks digits mnist minilm vlm-mnist] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import header, table

from compsearch.errors import CompsearchError
from compsearch.exports.artifact import output_error
from compsearch.exports.onnx import OnnxRuntimeModel, export_onnx
from compsearch.kernels.deploy import to_deploy
from compsearch.objectives.latency import threads
from compsearch.pipeline import compress
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe
from compsearch.tasks import get_task, move

RECIPE = Recipe(layers={"re:.*": LayerPlan(w_bits=8, a_bits=8)}, finetune=FinetuneBudget(steps=0),
                calibration=CalibrationPlan(batches=4, activation_mode="static"))  # fmt: skip


def interleaved_ms(task, models: dict[str, torch.nn.Module], rounds: int, budget_s: float):
    """Median ms per model: one forward of each per round, the order rotated every round; stops
    after ``rounds`` rounds or ``budget_s`` seconds (at least 3 rounds)."""
    batch = task.example_inputs()
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode(), threads(2):
        for name in names:  # warm-up
            for _ in range(2):
                task.forward(models[name], batch)
        started = time.perf_counter()
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                t0 = time.perf_counter()
                task.forward(models[name], batch)
                times[name].append((time.perf_counter() - t0) * 1e3)
            if index >= 2 and time.perf_counter() - started > budget_s:
                break
    return {name: statistics.median(values) for name, values in times.items()}, len(times[names[0]])


def run_task(name: str, rounds: int, budget_s: float, folder: Path) -> list[str]:
    task = get_task(name)
    example = move(task.calibration_batches(1)[0], "cpu")
    teacher, _ = to_deploy(task.teacher(), "cpu", lambda m: task.forward(m, example))
    result = compress(task, RECIPE)
    compressed = result.deployed
    exports = {"teacher": export_onnx(teacher, task, folder / f"{name}-teacher.onnx"),
               "compressed": export_onnx(compressed, task, folder / f"{name}-int8.onnx")}  # fmt: skip
    served = {key: OnnxRuntimeModel(value, 2) for key, value in exports.items()}
    models = {"torch teacher": teacher, "torch int8": compressed,
              "ort teacher": served["teacher"], "ort int8": served["compressed"]}  # fmt: skip
    medians, runs = interleaved_ms(task, models, rounds, budget_s)
    metric = task.primary_metric
    with torch.no_grad():
        scores = {key: task.evaluate(model, "test")[metric] for key, model in models.items()}
    error = output_error(task, compressed, served["compressed"], [task.example_inputs()])
    integer = len(exports["compressed"].integer_layers)
    base = medians["torch teacher"]
    return [
        name, metric,
        f"{scores['torch teacher']:.4f} / {scores['ort teacher']:.4f}",
        f"{scores['torch int8']:.4f} / {scores['ort int8']:.4f}",
        f"{base:.1f} / {medians['ort teacher']:.1f}",
        f"{medians['torch int8']:.1f} / {medians['ort int8']:.1f}",
        f"{base / medians['torch int8']:.2f}× / {base / medians['ort int8']:.2f}×",
        f"{integer} of {len(exports['compressed'].kernels)}",
        f"{error:.1e}",
        f"{len(result.artifact_bytes()) / 1e6:.2f} / {exports['compressed'].size_bytes / 1e6:.2f}",
        str(runs),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "minilm", "vlm-mnist"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=240.0, help="timing time per task")
    args = parser.parse_args()
    header("PyTorch eager vs ONNX Runtime: teacher and int8 deploy forms (CPU, 2 threads)")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.tasks:
            try:
                rows.append(run_task(name, args.rounds, args.budget_s, Path(scratch)))
            except CompsearchError as error:  # a row that says why, not a missing row
                rows.append([name, f"FAILED: {error}"] + [""] * 9)
            print(f"done: {name}", flush=True)
    table(["task", "metric", "teacher (torch / ORT)", "int8 (torch / ORT)",
           "teacher ms (torch / ORT)", "int8 ms (torch / ORT)",
           "int8 speed-up vs torch teacher (torch / ORT)", "integer layers (ORT)", "error",
           "MB (artifact / ONNX)", "rounds"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
