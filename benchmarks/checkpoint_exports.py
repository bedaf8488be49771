"""smollm recipes exported as compressed-tensors and GGUF: bytes, export time, and perplexity where
the format's own runtime can run it.

For each recipe below, SmolLM2-135M is calibrated (no fine-tune), saved as a compsearch artifact,
and exported with ``compsearch.exports.artifact.export_model`` to a compressed-tensors folder and a
GGUF file — each export loads its result back in its library and compares every tensor with
compsearch's, exactly, before it is written (a difference would stop this script). Perplexity on
the test half of ``lee.cor`` (1,024 tokens, the task's own token ids): compsearch's deploy form in
PyTorch, and the GGUF file in llama.cpp (``llama-cpp-python``, 2 threads, one pass over the same
ids with every position's logits) where a Python with ``llama_cpp`` is given. The teacher's own
GGUF (the package's Q4_1 file) is run in llama.cpp beside them.

Run: python benchmarks/checkpoint_exports.py [--llama-python PATH] [--fresh]
Results and artifacts are kept under runs/_benchmarks/exports/ (a rerun measures what is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import header, table

from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe

PROJECTIONS = r"re:model\.layers\..*"
TIED = {"model.embed_tokens": LayerPlan(w_bits=8), "lm_head": LayerPlan(w_bits=8)}
RECIPES = {
    "w8 g32": dict(w_bits=8, granularity="per_group", group_size=32),
    "w4 g32 intz gptq": dict(
        w_bits=4, granularity="per_group", group_size=32, w_format="intz", method="gptq"
    ),
    "w4 g32 int (mid-rise) gptq": dict(
        w_bits=4, granularity="per_group", group_size=32, method="gptq"
    ),
    "w4 g32 affine gptq": dict(
        w_bits=4, granularity="per_group", group_size=32, w_format="affine", method="gptq"
    ),
}
LLAMA_PERPLEXITY = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True, n_threads=2,
            verbose=False)
llm.eval(ids)  # llama.cpp's Llama.eval: runs the token ids through the model
logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
logits -= logits.max(-1, keepdims=True)
logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
nll = -float(np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))
print("RESULT " + json.dumps({"perplexity": math.exp(nll)}))
"""


def folder() -> Path:
    path = Path("runs/_benchmarks/exports")
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_perplexity(python: str | None, gguf: Path, ids: list[int]) -> float | None:
    if python is None:
        return None
    done = subprocess.run([python, "-c", LLAMA_PERPLEXITY, str(gguf)], input=json.dumps(ids),
                          capture_output=True, text=True, check=True)  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["perplexity"]


def test_ids(task) -> list[int]:
    return task._ids(task.eval_part("test"))[: task.eval_tokens].tolist()


def measure(name: str, task, python: str | None) -> dict:
    from compsearch.errors import ExportError
    from compsearch.exports.artifact import export_model
    from compsearch.pipeline import compress

    fields = RECIPES[name]
    recipe = Recipe(layers={PROJECTIONS: LayerPlan(**fields), **TIED},
                    finetune=FinetuneBudget(steps=0),
                    calibration=CalibrationPlan(batches=16, observer="mse"))  # fmt: skip
    recipe = replace(recipe, provenance=replace(recipe.provenance, task="smollm"))
    result = compress(task, recipe)
    where = folder() / name.replace(" ", "_").replace("(", "").replace(")", "")
    result.save(where / "model.safetensors")
    row = {"torch": task.evaluate(result.deployed, "test")["perplexity"],
           "artifact": (where / "model.safetensors").stat().st_size}  # fmt: skip
    for format in ("compressed-tensors", "gguf"):
        began = time.perf_counter()
        try:
            done = export_model(where, format, task=task)
        except ExportError as refused:  # what the format cannot hold: the reason goes in the table
            row[format] = {"refused": str(refused)}
            continue
        row[format] = {"bytes": done.size_bytes, "seconds": time.perf_counter() - began,
                       "types": sorted(set(done.layers.values()))[:4]}  # fmt: skip
    if "bytes" in row["gguf"]:
        row["llama.cpp"] = llama_perplexity(python, where / "model.gguf", test_ids(task))
    else:
        row["llama.cpp"] = None
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--llama-python", help="a Python with llama_cpp (default: this one, if it has it)"
    )
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    python = args.llama_python
    if python is None:
        try:
            import llama_cpp  # noqa: F401

            python = sys.executable
        except ImportError:
            python = None
    from compsearch.tasks import get_task
    from compsearch.tasks.language import smollm_path

    task = get_task("smollm")
    results = {}
    teacher_file = folder() / "teacher.json"
    if teacher_file.exists() and not args.fresh:
        results["teacher"] = json.loads(teacher_file.read_text())
    else:
        results["teacher"] = {"torch": task.evaluate(task.teacher(), "test")["perplexity"],
                              "gguf_bytes": smollm_path().stat().st_size,
                              "llama.cpp": llama_perplexity(python, smollm_path(), test_ids(task))}  # fmt: skip
        teacher_file.write_text(json.dumps(results["teacher"]))
    for name in RECIPES:
        path = folder() / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".json")
        if path.exists() and not args.fresh:
            results[name] = json.loads(path.read_text())
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(name, task, python)
        path.write_text(json.dumps(results[name]))
    header("Checkpoint exports of smollm: compressed-tensors and GGUF")
    teacher = results["teacher"]
    rows = [["teacher (Q4_1 GGUF, float32 in PyTorch)", teacher["torch"], "—", "—", "—",
             teacher["gguf_bytes"] / 1e6, "—", _ppl(teacher["llama.cpp"]),
             f"{(teacher['llama.cpp'] / teacher['torch'] - 1) * 100:+.2f} %"]]  # fmt: skip
    for name in RECIPES:
        r = results[name]
        ct, gg = r["compressed-tensors"], r["gguf"]
        drift = (
            "—" if r["llama.cpp"] is None else f"{(r['llama.cpp'] / r['torch'] - 1) * 100:+.2f} %"
        )
        rows.append([name, r["torch"], r["artifact"] / 1e6, _mb(ct), _seconds(ct), _mb(gg),
                     _seconds(gg), _ppl(r["llama.cpp"]), drift])  # fmt: skip
    table(["recipe", "perplexity, PyTorch deploy form", "artifact MB", "compressed-tensors MB",
           "export s", "GGUF MB", "export s", "perplexity, llama.cpp (GGUF)",
           "llama.cpp vs PyTorch"], rows)  # fmt: skip
    for name in RECIPES:
        for format in ("compressed-tensors", "gguf"):
            got = results[name][format]
            said = got.get("refused") or ", ".join(got["types"])
            print(f"- {name}, {format}: {said}")


def _mb(export: dict) -> str:
    return "refused" if "refused" in export else f"{export['bytes'] / 1e6:.1f}"


def _seconds(export: dict) -> str:
    return "—" if "refused" in export else f"{export['seconds']:.0f}"


def _ppl(value: float | None) -> str:
    return "not run" if value is None or math.isnan(value) else f"{value:.2f}"


if __name__ == "__main__":
    main()
