"""Post-training quantization of SmolLM2-135M (the ``smollm`` task), no fine-tuning: round-to-nearest
vs GPTQ vs AWQ at the same bits and group size, and int8 activations with and without SmoothQuant.

Each variant is compressed by ``pipeline.compress`` (``finetune.steps: 0``) in its own process, so
its peak resident memory is its own; its perplexity is measured on the test split (validation
beside it), its size is the artifact's file bytes, against the teacher's float32 safetensors file.
Every projection of the 30 decoder blocks gets the variant's weight format; the tied embedding and
LM head get int8 weights. Results are kept under runs/_benchmarks/llm_ptq/ (one JSON per variant),
so a rerun measures only what is missing.

Run: python benchmarks/llm_ptq.py [--variants NAME ...] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from _common import file_stem, header, measured_apart, results_folder, table

PROJECTIONS = "re:model\\.layers\\..*_proj$"
TIED = ("model.embed_tokens", "lm_head")

# name -> (projection plan, activation mode, options); 16 calibration batches of 4 x 128 tokens
VARIANTS = {  # group sizes divide SmolLM2's 576 and 1536 input features (128 does not divide 576)
    "w4 g64 rtn": (dict(w_bits=4, group_size=64), "static", {}),
    "w4 g64 gptq": (dict(w_bits=4, group_size=64, method="gptq"), "static", {"act_order": False}),
    "w4 g64 gptq act-order": (dict(w_bits=4, group_size=64, method="gptq"), "static", {}),
    "w4 g32 rtn": (dict(w_bits=4, group_size=32), "static", {}),
    "w4 g32 gptq": (dict(w_bits=4, group_size=32, method="gptq"), "static", {"act_order": False}),
    "w4 g32 gptq act-order": (dict(w_bits=4, group_size=32, method="gptq"), "static", {}),
    "w4 g32 gptq act-order, mse clipping": (
        dict(w_bits=4, group_size=32, method="gptq"), "static", {"observer": "mse"}),
    "w4 g32 gptq act-order, down_proj w8": (
        dict(w_bits=4, group_size=32, method="gptq"), "static", {"down_proj": 8}),
    "w4 g32 gptq act-order, down_proj w8, mse clipping": (
        dict(w_bits=4, group_size=32, method="gptq"), "static", {"down_proj": 8, "observer": "mse"}),
    "w4 g32 intz gptq act-order, mse clipping": (
        dict(w_bits=4, group_size=32, method="gptq", w_format="intz"), "static", {"observer": "mse"}),
    "w4 g32 affine rtn": (dict(w_bits=4, group_size=32, w_format="affine"), "static", {}),
    "w4 g32 affine gptq act-order, mse clipping": (
        dict(w_bits=4, group_size=32, method="gptq", w_format="affine"), "static",
        {"observer": "mse"}),
    "w4 g64 affine rtn": (dict(w_bits=4, group_size=64, w_format="affine"), "static", {}),
    "w4 g64 affine gptq act-order, mse clipping": (
        dict(w_bits=4, group_size=64, method="gptq", w_format="affine"), "static",
        {"observer": "mse"}),
    "w4 g64 awq": (dict(w_bits=4, group_size=64, method="awq"), "static", {}),
    "w4 g32 awq": (dict(w_bits=4, group_size=32, method="awq"), "static", {}),
    "w3 g32 rtn": (dict(w_bits=3, group_size=32), "static", {}),
    "w3 g32 gptq": (dict(w_bits=3, group_size=32, method="gptq"), "static", {"act_order": False}),
    "w4 g32 gptq, whole model per block": (dict(w_bits=4, group_size=32, method="gptq"), "static",
                                           {"act_order": False, "blockwise": False}),
    "w8a8 per-token": (dict(w_bits=8, a_bits=8), "dynamic", {}),
    "w8a8 per-token, smoothquant 0.5": (dict(w_bits=8, a_bits=8, smooth=0.5), "dynamic", {}),
    "w8a8 per-tensor": (dict(w_bits=8, a_bits=8), "static", {}),
    "w8a8 per-tensor, smoothquant 0.5": (dict(w_bits=8, a_bits=8, smooth=0.5), "static", {}),
}  # fmt: skip
CALIBRATION_BATCHES = 16


def folder() -> Path:
    return results_folder("llm_ptq")


def _file_name(name: str) -> str:
    return file_stem(name) + ".json"


def measure_teacher() -> dict:
    from compsearch.objectives.size import float_artifact
    from compsearch.tasks import get_task

    task = get_task("smollm")
    teacher = task.teacher()
    return {
        "validation": task.evaluate(teacher, "validation")["perplexity"],
        "test": task.evaluate(teacher, "test")["perplexity"],
        "bytes": len(float_artifact(teacher)),
    }


def measure_variant(name: str) -> dict:
    from dataclasses import replace

    from compsearch.kernels import gptq
    from compsearch.pipeline import compress
    from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe
    from compsearch.tasks import get_task

    fields, mode, options = VARIANTS[name]
    if not options.get("blockwise", True):
        gptq._block_chain = lambda *args: None  # every block collected by running the whole model
    if not options.get("act_order", True):  # natural column order, scales set group by group
        rows = gptq.gptq_rows
        gptq.gptq_rows = lambda *args, **kwargs: rows(*args, **{**kwargs, "act_order": False})
    task = get_task("smollm")
    layers = {}
    if "down_proj" in options:  # mixed precision: the down projections at more bits (the first
        # matching 're:' key sets a field, so this one comes before the one for every projection)
        layers["re:model\\.layers\\..*down_proj$"] = LayerPlan(**{**fields, "w_bits": 8})
    layers.update({PROJECTIONS: LayerPlan(**fields), **{key: LayerPlan(w_bits=8) for key in TIED}})
    recipe = Recipe(layers=layers, finetune=FinetuneBudget(steps=0),
                    calibration=CalibrationPlan(batches=CALIBRATION_BATCHES, activation_mode=mode,
                                                observer=options.get("observer", "minmax")))  # fmt: skip
    recipe = replace(recipe, provenance=replace(recipe.provenance, task="smollm"))
    began = time.perf_counter()
    result = compress(task, recipe)
    seconds = time.perf_counter() - began
    rounding = result.quant_report.rounding
    return {
        "validation": task.evaluate(result.deployed, "validation")["perplexity"],
        "test": task.evaluate(result.deployed, "test")["perplexity"],
        "bytes": len(result.artifact_bytes()),
        "seconds": seconds,
        "gptq_seconds": result.timings.get("gptq", 0.0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gptq_layers": len(rounding),
        "smoothed_layers": len(result.quant_report.smoothed),
        "skipped": len(result.quant_report.skipped),
        "skipped_reasons": sorted(set(result.quant_report.skipped.values()))[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--fresh", action="store_true", help="measure again what is stored")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one, print JSON
    args = parser.parse_args()
    if args.one:
        value = measure_teacher() if args.one == "teacher" else measure_variant(args.one)
        print("RESULT " + json.dumps(value))
        return
    results = measured_apart(__file__, ["teacher", *args.variants],
                             lambda name: folder() / _file_name(name), args.fresh)  # fmt: skip
    header("Post-training quantization of SmolLM2-135M: round-to-nearest vs GPTQ")
    teacher = results["teacher"]
    rows = [["teacher (float32)", f"{teacher['test']:.2f}", f"{teacher['validation']:.2f}", "—",
             f"{teacher['bytes'] / 1e6:.1f}", "1.00×", "—", "—"]]  # fmt: skip
    for name in args.variants:
        r = results[name]
        rows.append([
            name, f"{r['test']:.2f}", f"{r['validation']:.2f}",
            f"{100 * (r['test'] / teacher['test'] - 1):+.2f} %", f"{r['bytes'] / 1e6:.1f}",
            f"{teacher['bytes'] / r['bytes']:.2f}×", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
        ])  # fmt: skip
    table(["variant", "perplexity (test)", "validation", "vs teacher (test)", "MB (file)",
           "smaller", "compress s", "peak RSS MB"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
