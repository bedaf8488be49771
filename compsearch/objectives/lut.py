"""A latency lookup table: per-block and per-layer latencies profiled on the device, summed.

Each repeated block of a deploy form (a transformer layer, a residual block: the elements of its
ModuleLists and Sequentials) and each layer outside such blocks is keyed by what decides its cost —
type, kernel, weight shapes (so the format and the kept channels and heads), input shape and dtype,
fused activations — and timed once, alone, on this device, on an input of the recorded shape (a
block with the other arguments it was called with: masks, position embeddings). The table is cached
as JSON under the runs root and shared by every study on the device. What is left outside blocks
and layers (input preparation, pooling) is taken from the teacher: its measured latency minus its
table sum, scaled by activation volume.

A prediction is only trusted while it is checked: the first ``check_first`` trials and every
``check_every``-th are also measured end to end; once the median relative error of those checks
exceeds ``bound``, every later trial is measured instead. The checks are not kept in this object:
the caller passes the errors the study recorded (``errors``) and the trial's number, so every worker
of a study decides alike. A value from the table is labelled ``latency_source: predicted``, with
the table's checked error beside it; a checked trial reports the measured value, timed interleaved
with the teacher for ``repeats`` pairs (its speed-up a paired ratio, as a trial without a table).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from compsearch._files import write_text_atomic
from compsearch.objectives.latency import threads
from compsearch.tasks.base import Task, move

PROFILED = (
    "Linear", "Conv2d", "Embedding", "DeployLinear", "DeployConv2d", "DeployEmbedding", "Conv1D",
    # activations and norms: their cost moves with pruning and disappears when fused
    "LayerNorm", "BatchNorm2d", "GELU", "GELUActivation", "NewGELUActivation", "ReLU", "SiLU",
    "LlamaRMSNorm", "Tanh", "AdaptiveAvgPool2d", "AvgPool2d", "MaxPool2d",
)  # fmt: skip


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Elements of ModuleLists / Sequentials that hold profiled layers (outermost first wins)."""
    found: list[nn.Module] = []
    taken: set[int] = set()
    for module in model.modules():
        if id(module) in taken or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        for child in module.children():
            inner = [m for m in child.modules() if type(m).__name__ in PROFILED]
            if list(child.children()) and inner:
                found.append(child)
                taken.update(id(m) for m in child.modules())
    return found


def _describe(module: nn.Module, x: torch.Tensor) -> str:
    if list(module.children()):  # a block: every layer inside decides its cost
        inner = [
            f"{name}:{_describe(child, x)}"
            for name, child in module.named_modules()
            if name and not list(child.children())
        ]
        digest = hashlib.sha256("\n".join(inner).encode()).hexdigest()[:16]
        return f"block|{type(module).__name__}|{digest}|x={_input(x)}"
    parts = [type(module).__name__, getattr(module, "kernel", "float")]
    for attribute in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                      "stride", "padding", "groups", "num_embeddings", "embedding_dim", "nf", "nx",
                      "post_op"):  # fmt: skip
        value = getattr(module, attribute, None)
        if value is not None:
            parts.append(f"{attribute}={value}")
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        parts.append(f"w={tuple(weight.shape)}")
    codes = getattr(module, "codes", None)
    if isinstance(codes, torch.Tensor):
        parts.append(f"codes={tuple(codes.shape)}")
    if getattr(module, "output_scale", None) is not None:
        parts.append("uint8-out")
    parts.append(f"x={_input(x)}")
    return "|".join(parts)


def _input(x: torch.Tensor) -> str:
    """Shape, dtype and, for a 4-D input, its memory layout: the same pooling or convolution can
    run 15x apart on NCHW and channels-last input (digits' max-pool on this CPU)."""
    layout = ":channels_last" if x.dim() == 4 and _channels_last(x) else ""
    return f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}{layout}"


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class LatencyTable:
    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        thread_count: int | None = 2,
        bound: float = 0.15,
        check_first: int = 5,
        check_every: int = 10,
        repeats: int = 10,
    ) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.thread_count = thread_count
        self.bound, self.check_first, self.check_every = bound, check_first, check_every
        self.repeats = repeats
        self.entries: dict[str, float] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())["entries"]
            except (ValueError, KeyError):
                self.entries = {}
        self.residual_ms = 0.0
        self.teacher_volume = 1.0

    # -- profiling

    def _calls(self, model: nn.Module, task: Task) -> list[tuple]:
        """``(module, args, kwargs, output elements)`` of every block and every layer outside blocks
        in one forward on the task's example inputs."""
        blocks = _blocks(model)
        inside = {id(m) for block in blocks for m in block.modules() if m is not block}
        calls: list[tuple] = []

        def hook(module, args, kwargs, output):
            first = output[0] if isinstance(output, tuple) else output
            if args and isinstance(args[0], torch.Tensor) and isinstance(first, torch.Tensor):
                calls.append((module, args, kwargs, first.numel()))

        chosen = blocks + [
            m
            for m in model.modules()
            if type(m).__name__ in PROFILED and not list(m.children()) and id(m) not in inside
        ]
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in chosen]
        try:
            with torch.inference_mode():
                task.forward(model, move(task.example_inputs(), self.device))
        finally:
            for handle in handles:
                handle.remove()
        return calls

    def _time(self, module: nn.Module, args: tuple, kwargs: dict) -> float:
        x = args[0]
        if x.dtype in (torch.int64, torch.int32):
            sample = torch.randint(0, int(x.max()) + 1, x.shape, device=x.device, dtype=x.dtype)
        elif x.dtype == torch.uint8:
            sample = torch.randint(0, 256, x.shape, device=x.device, dtype=torch.uint8)
        else:
            sample = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            sample = sample.contiguous(memory_format=torch.channels_last)
        call_args = (sample, *args[1:])
        times = []
        with (
            torch.inference_mode(),
            threads(self.thread_count if self.device.type == "cpu" else None),
        ):
            for _ in range(2):
                module(*call_args, **kwargs)
            for _ in range(self.repeats):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                module(*call_args, **kwargs)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    def layer_sum(self, model: nn.Module, task: Task) -> tuple[float, float]:
        """Σ of the table's per-layer latencies for ``model`` (profiling what is missing), and the
        activation volume (elements its layers write)."""
        total, volume, added = 0.0, 0.0, False
        for module, args, kwargs, out_elements in self._calls(model, task):
            key = _describe(module, args[0])
            if key not in self.entries:
                self.entries[key] = self._time(module, args, kwargs)
                added = True
            total += self.entries[key]
            volume += out_elements
        if added:
            write_text_atomic(self.path, json.dumps({"device": str(self.device),
                                                     "entries": self.entries}, indent=0))  # fmt: skip
        return total, volume

    # -- predicting

    def calibrate(self, teacher: nn.Module, task: Task, measured_ms: float) -> None:
        layers_ms, volume = self.layer_sum(teacher, task)
        self.residual_ms = max(0.0, measured_ms - layers_ms)
        self.teacher_volume = max(volume, 1.0)

    def predict(self, model: nn.Module, task: Task) -> float:
        layers_ms, volume = self.layer_sum(model, task)
        return layers_ms + self.residual_ms * volume / self.teacher_volume

    def trusted(self, errors: list[float]) -> bool:
        """Whether predictions may stand in for measurements, given the checks made so far."""
        return not errors or statistics.median(errors) <= self.bound

    def latency(
        self, model: nn.Module, task: Task, objective, number: int, errors: list[float]
    ) -> dict[str, float | str]:
        """The value the latency objective reports for trial ``number``, and where it came from
        (see the module docstring); ``errors`` are the relative errors of the study's checks."""
        predicted = self.predict(model, task)
        check = (
            not self.trusted(errors)
            or number < self.check_first
            or (number + 1) % self.check_every == 0
        )
        if not check:
            return {objective.name: predicted, "latency_predicted_ms": predicted,
                    "latency_table_error": statistics.median(errors),
                    "latency_source": "predicted"}  # fmt: skip
        return objective.check(model, task, predicted, 0.0)  # `repeats` pairs with the teacher
