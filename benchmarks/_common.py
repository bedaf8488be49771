"""Shared helpers for the benchmark scripts: timing, the machine line, and table printing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            names = [line for line in stream if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{gpu}"
    )


def header(title: str) -> None:
    command = " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = time.strftime("%Y-%m-%d")
    print(f"## {title}\n")
    print(f"Machine: {machine()}. Date: {stamp}. Command: `python {command}`.\n")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    if commit:
        print(f"Commit: {commit}.\n")


def median_ms(
    fn: Callable[[], object], runs: int = 20, warmup: int = 3, cuda: bool = False
) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA: device events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def table(columns: list[str], rows: list[list[object]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(v) for v in row) + " |")
    print()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def measured_apart(script: str, jobs: list[str], path_of: Callable[[str], Path],
                   fresh: bool = False) -> dict[str, dict]:  # fmt: skip
    """Each job measured by ``script --one JOB`` in its own process (so its peak memory is its
    own), which prints ``RESULT <json>``; kept at ``path_of(job)``, so a rerun measures only what
    is missing (``fresh``: everything again)."""
    results = {}
    for job in jobs:
        path = path_of(job)
        if path.exists() and not fresh:
            results[job] = json.loads(path.read_text())
            continue
        print(f"measuring {job} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, script, "--one", job], capture_output=True,
                              text=True, check=False)  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{job}: failed (exit {done.returncode})\n{done.stderr[-4000:]}")
        results[job] = json.loads(lines[-1][len("RESULT ") :])
        path.write_text(json.dumps(results[job], indent=1))
    return results


def results_folder(name: str) -> Path:
    """Where a benchmark keeps its measurements: ``<runs root>/_benchmarks/<name>``."""
    from compsearch.paths import runs_root

    path = runs_root() / "_benchmarks" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_stem(label: str) -> str:
    return label.replace(" ", "_").replace(",", "").replace(":", ".")
