"""Shared helpers for the benchmark scripts: timing, the machine line, and table printing."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

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
