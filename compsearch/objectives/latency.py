"""Latency, measured on the target device on the deploy form as it would be served.

CPU: a fixed thread count, the task's example inputs, warm-up runs, then the median (and spread) of
repeated runs. CUDA: the forward captured in a CUDA graph (small models are launch-bound otherwise),
timed with device events.

Runtime: ``torch`` times the deploy form in PyTorch; ``onnxruntime`` exports each model measured —
candidate and teacher alike — to ONNX (:mod:`compsearch.exports.onnx`) and times its ONNX Runtime
session with the same thread count, so the number optimized is the one that runtime serves.

Noise: a shared machine's load changes from one second to the next, so a trial's latency is
measured *interleaved* with the teacher's deploy form — teacher, candidate, candidate, teacher, … —
in the same process. The ratio of each adjacent pair is what a relative bound (``"0.5x"``) is
checked on and what ``speedup`` reports; both sides see the same load. Runs continue past
``repeats`` until the 95 % confidence interval of the median ratio is within ``ci`` of it (relative
half-width), or ``max_repeats``. Where the teacher's own time moved more than ``drift`` from the
study's reference, the machine changed under the study: the trial is measured again (twice at
most), and the drift it ends with is recorded beside the value. A trial that will be screened
(:mod:`compsearch.search.trial`) stops as soon as its interval lies wholly above the latency bound,
or at the sixth pair where an exact cost already breaks its bound, and is not measured again for a
drifted teacher: no more runs could make it feasible, and its value only teaches the sampler
(``latency_settled`` marks it).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compsearch.kernels.capture import capture
from compsearch.objectives.base import Candidate, Objective
from compsearch.tasks.base import Task, move

#: re-measurements of a trial whose teacher reference drifted, before its values are kept as they are
REMEASURE = 2


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    #: interleaved with a reference: the reference's median and the median of the pairwise ratios
    reference_ms: float = 0.0
    ratio: float = 0.0
    #: relative half-width of the 95 % confidence interval of the median (of the ratio, where
    #: interleaved)
    ci: float = 0.0
    #: the runs stopped early because ``settled`` said no more could change the decision
    settled: bool = False

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


def median_ci(values: list[float]) -> float:
    """Relative half-width of the distribution-free 95 % confidence interval of the median (order
    statistics ``n/2 ± 0.98·√n``); below 6 values, of their whole range (an interval this few runs
    cannot make narrower); infinite for none."""
    n = len(values)
    if not n:
        return math.inf
    ordered = sorted(values)
    low = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)) - 1)
    high = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)))
    if n < 6:
        low, high = 0, n - 1
    middle = statistics.median(ordered)
    return (ordered[high] - ordered[low]) / (2 * middle) if middle else math.inf


def clearly_above(values: list[float], limit: float) -> bool:
    """Whether the 95 % interval of the median of ``values`` lies wholly above ``limit`` (always,
    for a limit of 0: a bound already broken elsewhere)."""
    return limit <= 0 or statistics.median(values) * (1 - median_ci(values)) > limit


def _past(limit: float, relative: bool, times: list[float], ratios: list[float]) -> bool:
    """Whether a bound is clearly broken: on the ratio to the teacher where it is relative."""
    return clearly_above(ratios if relative else times, limit)


def _timer(model: nn.Module, task: Task, batch, device: torch.device,
           warmup: int) -> Callable[[], float]:  # fmt: skip
    """Warm ``model`` up; return a function that times one forward in milliseconds."""
    model.eval()

    def call(inputs):
        return task.forward(model, inputs)

    if device.type == "cuda":
        replay = capture(call, batch, warmup=warmup)
        for _ in range(warmup):
            replay(batch)

        def timed() -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            replay(batch)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return timed
    for _ in range(warmup):
        call(batch)

    def timed() -> float:
        started = time.perf_counter()
        call(batch)
        return (time.perf_counter() - started) * 1e3

    return timed


def measure_latency(
    model: nn.Module,
    task: Task,
    device: str | torch.device = "cpu",
    thread_count: int | None = 2,
    warmup: int = 3,
    repeats: int = 20,
    reference: nn.Module | None = None,
    ci: float = 0.0,
    max_repeats: int | None = None,
    settled: Callable[[list[float], list[float]], bool] | None = None,
) -> LatencyResult:
    """Median latency of ``task.forward(model, example_inputs)`` on ``device``, in milliseconds.

    With ``reference``, each run of ``model`` is paired with one of ``reference`` (alternating which
    goes first) and the result carries the median pairwise ratio. With ``ci`` > 0, runs go on past
    ``repeats`` until the median's 95 % interval is within ``ci`` (relative), or ``max_repeats``.
    ``settled(times, ratios)`` True (asked from the sixth run on) stops the runs at once."""
    device = torch.device(device)
    batch = move(task.example_inputs(), device)
    cap = max(repeats, max_repeats or repeats) if ci > 0 else repeats
    times: list[float] = []
    reference_times: list[float] = []
    ratios: list[float] = []
    stopped = False
    with torch.inference_mode(), threads(thread_count if device.type == "cpu" else None):
        run = _timer(model, task, batch, device, warmup)
        run_reference = _timer(reference, task, batch, device, warmup) if reference else None
        for index in range(cap):
            if run_reference is None:
                times.append(run())
            elif index % 2:
                times.append(run())
                reference_times.append(run_reference())
            else:
                reference_times.append(run_reference())
                times.append(run())
            if run_reference is not None:
                ratios.append(times[-1] / reference_times[-1])
            if settled is not None and len(times) >= 6 and settled(times, ratios):
                stopped = True
                break
            if len(times) >= repeats and (
                ci <= 0 or (len(times) >= 6 and median_ci(ratios or times) <= ci)
            ):
                break
    ordered = sorted(times)
    return LatencyResult(
        statistics.median(ordered),
        ordered[int(0.1 * (len(ordered) - 1))],
        ordered[int(0.9 * (len(ordered) - 1))],
        len(ordered),
        statistics.median(reference_times) if reference_times else 0.0,
        statistics.median(ratios) if ratios else 0.0,
        median_ci(ratios or times),
        stopped,
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
        ci: float = 0.05,
        max_repeats: int = 60,
        drift: float = 0.25,
        runtime: str = "torch",
    ) -> None:
        self.device = device
        self.runtime = runtime
        self._served: dict[int, tuple[nn.Module, nn.Module]] = {}  # id → (model, its served form)
        self._scratch = None  # a temporary folder for the exported graphs
        self.thread_count = thread_count
        self.warmup = warmup
        self.repeats = repeats
        self.table = table
        self.ci = ci
        self.max_repeats = max_repeats
        self.drift = drift
        self.teacher_ms = 0.0
        self.reference: nn.Module | None = None  # the teacher's deploy form, timed alongside

    @classmethod
    def build(cls, setup) -> LatencyObjective:
        return cls(setup.device, setup.threads, setup.warmup, setup.repeats, setup.table,
                   setup.latency_ci, setup.max_repeats, setup.latency_drift,
                   setup.runtime)  # fmt: skip

    def served(self, model: nn.Module, task: Task) -> nn.Module:
        """What is timed for ``model``: itself, or its ONNX Runtime session (made once per model;
        the teacher's and the latest candidate's are kept)."""
        if self.runtime == "torch":
            return model
        kept = self._served.get(id(model))
        if kept is not None and kept[0] is model:
            return kept[1]
        import tempfile

        from compsearch.exports.onnx import onnxruntime_form

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="compsearch-onnx-")
        form = onnxruntime_form(model, task, self._scratch.name, self.thread_count)
        reference = self._served.get(id(self.reference)) if self.reference is not None else None
        for old, old_form in self._served.values():  # one candidate's graph at a time on disk
            if old is not self.reference:
                old_form.remove_files()
        self._served = {id(model): (model, form)}
        if reference is not None and reference[0] is self.reference:
            self._served[id(self.reference)] = reference
        return form

    def use_reference(self, reference: Candidate) -> None:
        self.reference = reference.deployed
        if self.runtime != "torch":
            self.served(reference.deployed, reference.task)

    def restore(self, teacher: dict[str, float]) -> None:
        self.teacher_ms = teacher["latency_ms"]

    def measure_model(self, model: nn.Module, task: Task) -> LatencyResult:
        served = self.served(model, task)
        return measure_latency(
            served, task, self.device, self.thread_count, self.warmup, self.repeats
        )

    def prepare(self, reference: Candidate) -> None:
        # the reference every ratio and the lookup table hang on: median of three measurements
        self.use_reference(reference)
        results = [self.measure_model(reference.deployed, reference.task) for _ in range(3)]
        self.teacher_ms = statistics.median(r.median_ms for r in results)
        if self.table is not None:
            self.table.calibrate(reference.deployed, reference.task, self.teacher_ms)

    def measure_interleaved(self, model: nn.Module, task: Task, ci: float | None = None,
                            above: tuple[float, bool] | None = None) -> dict[str, float | str]:  # fmt: skip
        """Latency of ``model`` timed alongside the teacher (see the module docstring); ``ci`` 0
        stops at ``repeats`` pairs. ``above`` — a bound ``(limit, relative)`` past which the
        candidate is screened — stops the runs once the interval lies wholly above it (on the
        ratio to the teacher where relative, on the milliseconds otherwise)."""
        ci = self.ci if ci is None else ci
        settled = None if above is None else functools.partial(_past, *above)
        remeasured = 0
        while True:
            reference = None if self.reference is None else self.served(self.reference, task)
            result = measure_latency(self.served(model, task), task, self.device,
                                     self.thread_count, self.warmup, self.repeats, reference, ci,
                                     self.max_repeats, settled)  # fmt: skip
            drift = result.reference_ms / self.teacher_ms - 1 if self.teacher_ms else 0.0
            if abs(drift) <= self.drift or remeasured == REMEASURE or result.settled:
                break  # a settled candidate is screened whatever the machine did
            remeasured += 1
        out = {self.name: result.median_ms, "latency_spread": result.spread,
                "latency_ci": result.ci, "latency_runs": float(result.runs),
                "speedup": 1.0 / result.ratio, "teacher_latency_ms": result.reference_ms,
                "latency_drift": drift, "latency_remeasured": float(remeasured),
                "latency_source": "measured", "latency_runtime": self.runtime}  # fmt: skip
        if result.settled:
            out["latency_settled"] = 1.0
        return out

    def check(self, model: nn.Module, task: Task, predicted: float,
              ci: float | None = None) -> dict[str, float | str]:  # fmt: skip
        """``model`` measured end to end against the latency table's ``predicted`` value —
        interleaved with the teacher where it has one, so its speed-up is a paired ratio — with
        the prediction's error (``latency_check_error``)."""
        if self.reference is not None:
            out = self.measure_interleaved(model, task, ci)
        else:
            out = self.measure_alone(model, task)
        measured = float(out[self.name])
        out.update({"latency_predicted_ms": predicted,
                    "latency_check_error": abs(predicted - measured) / measured})  # fmt: skip
        return out

    def confirm(self, model: nn.Module, task: Task, predicted: float) -> dict[str, float | str]:
        """The measurement that replaces the table's ``predicted`` latency of ``model`` (a
        table-mode trial about to join the front), timed as a trial without a table is; the
        prediction's error recorded as one more check of the table."""
        return {**self.check(model, task, predicted), "latency_confirmed": 1.0}

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
        elif self.reference is not None:
            # the sensitivity table's many untrained variants feed a fitted cost model: a fixed
            # number of pairs each, not the interval a trial's value must reach
            quick = candidate.extra.get("prediction_only")
            return self.measure_interleaved(candidate.deployed, candidate.task,
                                            0.0 if quick else None,
                                            candidate.extra.get("latency_above"))  # fmt: skip
        else:
            return self.measure_alone(candidate.deployed, candidate.task)
        if self.teacher_ms and "speedup" not in out:  # a table check's is its paired ratio
            out["speedup"] = self.teacher_ms / out[self.name]
        return out

    def measure_alone(self, model: nn.Module, task: Task) -> dict[str, float | str]:
        """``model`` timed by itself (no teacher to pair with): its speed-up is against the
        study's reference time of the teacher."""
        result = self.measure_model(model, task)
        out = {self.name: result.median_ms, "latency_spread": result.spread,
               "latency_ci": result.ci, "latency_source": "measured"}  # fmt: skip
        if self.teacher_ms:
            out["speedup"] = self.teacher_ms / result.median_ms
        return out
