"""Every CUDA path in one command (`make gpu-check`): the CUDA-marked tests, the GPU deploy tables
(bf16 vs int8 vs fp8, captured in CUDA graphs) and a short `device: cuda` search on mnist followed
by export, a final run and `evaluate --device cuda`; then one summary.

Each step runs in its own process with its own time limit, so one failure does not hide the rest.
On a machine where torch sees no CUDA device it stops at once with exit code 2: it never passes
there. The search runs in a fresh runs root (``--runs``, default a temporary folder), so it trains
the mnist teacher on the GPU too.

Run: python benchmarks/gpu_check.py [--out DIR] [--runs DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
STUDY = "gpu-check-mnist"


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: int
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""


def _run(step: Step, env: dict[str, str], log) -> None:
    print(f"\n### {step.name}\n$ {' '.join(step.command)}", flush=True)
    log.write(f"\n### {step.name}\n$ {' '.join(step.command)}\n")
    began = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step.limit_s, check=False)  # fmt: skip
        step.output = done.stdout + done.stderr
        step.status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as error:
        step.output = _text(error.stdout) + _text(error.stderr)
        step.status = f"timed out after {step.limit_s} s"
    step.seconds = time.perf_counter() - began
    print(step.output[-6000:], flush=True)
    log.write(step.output + "\n")
    log.flush()


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _search_config(folder: Path) -> Path:
    """configs/mnist.yaml on cuda, small: 8 trials of 40 steps, a 200-step final run."""
    config = yaml.safe_load((ROOT / "configs" / "mnist.yaml").read_text())
    config["study"] = STUDY
    config["device"] = "cuda"
    config["search"].update(trials=8, finetune_steps=40, plans=2)
    config["final"]["steps"] = 200
    path = folder / "gpu-check-mnist.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _device_lines() -> list[str]:
    from compsearch.kernels.deploy import deploy_table
    from compsearch.kernels.devices import fp8_available, int_mm_available

    fast = sorted({f"{r.layer} {r.w_format} w{r.w_bits} ({r.kernel})"
                   for r in deploy_table("cuda") if r.fast})  # fmt: skip
    major, minor = torch.cuda.get_device_capability()
    return [
        f"GPU: {torch.cuda.get_device_name()}, compute capability {major}.{minor}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}",
        f"int8 torch._int_mm: {int_mm_available('cuda')}; fp8 torch._scaled_mm: "
        f"{fp8_available('cuda')}",
        "fast kernels in the deploy table: " + ("; ".join(fast) or "none"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpu-check.md (summary) and gpu-check.log")
    parser.add_argument("--runs", help="runs root for the search (default: a temporary folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu-check: expected a CUDA device, but torch sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU "
            "machine with a CUDA build of torch; on this machine nothing was checked.",
            file=sys.stderr,
        )
        return 2
    began = time.perf_counter()
    out = Path(args.out or ROOT / "runs" / "_gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="compsearch-gpu-check-"))
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COMPSEARCH_RUNS": str(runs), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    config = _search_config(runs)
    study = runs / STUDY
    cli = [sys.executable, "-m", "compsearch"]
    pytest = [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "cuda", "-ra", "-q"]
    steps = [
        Step("CUDA-marked tests", [*pytest, "-p", "no:cacheprovider", "tests"], 180),
        Step(
            "GPU deploy tables", [sys.executable, "benchmarks/quant_speed.py", "--only", "cuda"], 60
        ),
        Step("mnist search on cuda", [*cli, "search", str(config)], 180),
        Step("export the knee", [*cli, "export", str(study), "--knee"], 30),
        Step("final run on cuda", [*cli, "train", str(study / "recipes" / "knee.yaml")], 60),
        Step(
            "evaluate --device cuda",
            [*cli, "evaluate", str(study / "final" / "knee"), "--device", "cuda"],
            30,
        ),
    ]
    lines = _device_lines()
    with open(out / "gpu-check.log", "w") as log:
        log.write("\n".join(lines) + "\n")
        for step in steps:
            _run(step, env, log)
    failed = [s for s in steps if s.status != "passed"]
    summary = ["# gpu-check", "", *[f"- {line}" for line in lines], "",
               "| step | result | seconds | last line |", "|---|---|---|---|"]  # fmt: skip
    for step in steps:
        tail = [line for line in step.output.strip().splitlines() if line.strip()]
        last = tail[-1].replace("|", "/")[:140] if tail else ""
        summary.append(f"| {step.name} | {step.status} | {step.seconds:.0f} | {last} |")
    summary += ["", f"{len(steps) - len(failed)} of {len(steps)} steps passed in "
                f"{time.perf_counter() - began:.0f} s; runs root {runs}."]  # fmt: skip
    text = "\n".join(summary)
    (out / "gpu-check.md").write_text(text + "\n")
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
