"""Peak memory of calibrating SmolLM2-135M (the ``smollm`` task) one block at a time from its GGUF
file (``compsearch.sequential``) against the whole model in memory (``pipeline.compress``), same
recipe, each in its own process; the two artifacts must be byte for byte equal.

Rows: the floor (Python, torch, transformers and the tokenized calibration data, no model), then
per recipe the in-memory run and the one-block-at-a-time run: peak resident memory (ru_maxrss of
the process), seconds, the largest float block held, the artifact's bytes. The artifact written one
block at a time is then loaded in a fresh process and its perplexity measured on the test split.
Results are kept under runs/_benchmarks/sequential/ (one JSON per run), so a rerun measures only
what is missing.

Run: python benchmarks/sequential_memory.py [--fresh]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from _common import file_stem, header, measured_apart, results_folder, table
from llm_ptq import CALIBRATION_BATCHES, PROJECTIONS, TIED

RECIPES = {  # name -> (projection plan, observer)
    "w4 g32 gptq act-order, mse clipping": (dict(w_bits=4, group_size=32, method="gptq"), "mse"),
    "w4 g32 affine rtn": (dict(w_bits=4, group_size=32, w_format="affine"), "minmax"),
}
MODES = ("in memory", "one block at a time")


def folder() -> Path:
    return results_folder("sequential")


def _recipe(name: str):
    from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe

    fields, observer = RECIPES[name]
    layers = {PROJECTIONS: LayerPlan(**fields), **{key: LayerPlan(w_bits=8) for key in TIED}}
    return Recipe(layers=layers, finetune=FinetuneBudget(steps=0),
                  calibration=CalibrationPlan(batches=CALIBRATION_BATCHES, observer=observer))  # fmt: skip


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(job: str) -> dict:
    from compsearch.tasks import get_task

    task = get_task("smollm")
    if job == "floor":
        task.calibration_batches(CALIBRATION_BATCHES)
        return {"peak_rss_mb": _peak_mb()}
    kind, name = job.split(":", 1)
    target = folder() / f"{file_stem(name)}.{file_stem(kind)}.safetensors"
    if kind == "evaluate":
        from compsearch import load

        model = load(
            folder() / f"{file_stem(name)}.{file_stem(MODES[1])}.safetensors", task="smollm"
        )
        return {"test": task.evaluate(model, "test")["perplexity"],
                "validation": task.evaluate(model, "validation")["perplexity"]}  # fmt: skip
    began = time.perf_counter()
    if kind == MODES[0]:
        from compsearch.pipeline import compress

        compress(task, _recipe(name)).save(target)
        largest = None
    else:
        from compsearch.sequential import compress_sequentially

        largest = compress_sequentially(task, _recipe(name), target).largest_block_mb
    return {"peak_rss_mb": _peak_mb(), "seconds": time.perf_counter() - began,
            "bytes": target.stat().st_size, "largest_block_mb": largest}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh", action="store_true", help="measure again what is stored")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one)))
        return
    jobs = ["floor"] + [f"{mode}:{name}" for name in RECIPES for mode in MODES]
    jobs += [f"evaluate:{name}" for name in RECIPES]
    results = measured_apart(
        __file__, jobs, lambda job: folder() / f"{file_stem(job)}.json", args.fresh
    )
    header("Calibrating SmolLM2-135M one block at a time vs in memory")
    floor = results["floor"]["peak_rss_mb"]
    rows = [["floor: Python, torch, transformers, tokenized data", "—", f"{floor:.0f}", "—", "—",
             "—", "—"]]  # fmt: skip
    for name in RECIPES:
        files = [folder() / f"{file_stem(name)}.{file_stem(mode)}.safetensors" for mode in MODES]
        same = files[0].read_bytes() == files[1].read_bytes()
        evaluated = results[f"evaluate:{name}"]
        for mode in MODES:
            r = results[f"{mode}:{name}"]
            largest = "—" if r["largest_block_mb"] is None else f"{r['largest_block_mb']:.1f}"
            rows.append([
                f"{name}: {mode}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
                f"{r['peak_rss_mb'] - floor:.0f}", largest, f"{r['bytes'] / 1e6:.1f}",
                "—" if mode == MODES[0] else
                f"{'byte-equal' if same else 'DIFFERENT'}; perplexity test {evaluated['test']:.2f}, "
                f"validation {evaluated['validation']:.2f}",
            ])  # fmt: skip
    table(["run", "seconds", "peak RSS MB", "above floor MB", "largest float block MB",
           "artifact MB", "artifact vs in memory"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
