"""Latency, measured on the target device on the deploy form as it would be served.

CPU: a fixed thread count, the task's example inputs, warm-up runs, then the median (and spread) of
repeated runs. CUDA: the forward captured in a CUDA graph (small models are launch-bound otherwise),
timed with device events.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from compsearch.kernels.capture import capture
from compsearch.objectives.base import Candidate, Objective
from compsearch.tasks.base import Task, move


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: how noisy the measurement was."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0


@contextlib.contextmanager
def threads(count: int | None):
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    model: nn.Module,
    task: Task,
    device: str | torch.device = "cpu",
    thread_count: int | None = 2,
    warmup: int = 3,
    repeats: int = 20,
) -> LatencyResult:
    """Median latency of ``task.forward(model, example_inputs)`` on ``device``, in milliseconds."""
    device = torch.device(device)
    batch = move(task.example_inputs(), device)
    model.eval()

    def call(inputs):
        return task.forward(model, inputs)

    times: list[float] = []
    with torch.inference_mode(), threads(thread_count if device.type == "cpu" else None):
        if device.type == "cuda":
            replay = capture(call, batch, warmup=warmup)
            for _ in range(warmup):
                replay(batch)
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                replay(batch)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(warmup):
                call(batch)
            for _ in range(repeats):
                started = time.perf_counter()
                call(batch)
                times.append((time.perf_counter() - started) * 1e3)
    ordered = sorted(times)
    return LatencyResult(
        statistics.median(ordered),
        ordered[int(0.1 * (len(ordered) - 1))],
        ordered[int(0.9 * (len(ordered) - 1))],
        len(ordered),
    )


class LatencyObjective(Objective):
    """Measured latency of the deploy form (``latency_ms``), with its spread and the ratio to the
    teacher's deploy form measured the same way. With a :class:`~compsearch.objectives.lut.LatencyTable`
    the value may come from the table instead (see there for when)."""

    name = "latency_ms"
    direction = "minimize"
    unit = "ms"

    def __init__(
        self,
        device: str = "cpu",
        thread_count: int | None = 2,
        warmup: int = 3,
        repeats: int = 20,
        table=None,
    ) -> None:
        self.device = device
        self.thread_count = thread_count
        self.warmup = warmup
        self.repeats = repeats
        self.table = table
        self.teacher_ms = 0.0

    @classmethod
    def build(cls, setup) -> LatencyObjective:
        return cls(setup.device, setup.threads, setup.warmup, setup.repeats, setup.table)

    def restore(self, teacher: dict[str, float]) -> None:
        self.teacher_ms = teacher["latency_ms"]

    def measure_model(self, model: nn.Module, task: Task) -> LatencyResult:
        return measure_latency(
            model, task, self.device, self.thread_count, self.warmup, self.repeats
        )

    def prepare(self, reference: Candidate) -> None:
        # the reference every ratio and the lookup table hang on: median of three measurements
        results = [self.measure_model(reference.deployed, reference.task) for _ in range(3)]
        self.teacher_ms = statistics.median(r.median_ms for r in results)
        if self.table is not None:
            self.table.calibrate(reference.deployed, reference.task, self.teacher_ms)

    def measure(self, candidate: Candidate) -> dict[str, float | str]:
        """Measured latency; with a table, possibly its prediction for trial ``candidate.extra
        ['trial']`` given the study's earlier ``latency_checks`` (always, where ``candidate.extra
        ['prediction_only']``: the sensitivity table's many untrained variants) — labelled by
        ``latency_source`` either way."""
        if self.table is not None and candidate.extra.get("prediction_only"):
            predicted = self.table.predict(candidate.deployed, candidate.task)
            out = {self.name: predicted, "latency_predicted_ms": predicted,
                   "latency_source": "predicted"}  # fmt: skip
        elif self.table is not None:
            number = candidate.extra.get("trial", 0)
            errors = candidate.extra.get("latency_checks", [])
            out = self.table.latency(candidate.deployed, candidate.task, self, number, errors)
        else:
            result = self.measure_model(candidate.deployed, candidate.task)
            out = {self.name: result.median_ms, "latency_spread": result.spread,
                   "latency_source": "measured"}  # fmt: skip
        if self.teacher_ms:
            out["speedup"] = self.teacher_ms / out[self.name]
        return out
