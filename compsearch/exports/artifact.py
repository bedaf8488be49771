"""``export_model``: a serving format written from a compsearch artifact, checked by its own runtime
or library.

compressed-tensors (a folder vLLM and transformers load) and GGUF (llama.cpp) are written from the
artifact's own codes and scales and loaded back before they are published: every tensor must come
back exactly as compsearch stores it (:mod:`compsearch.exports.compressed_tensors`,
:mod:`compsearch.exports.gguf_file`); what a format cannot hold is refused with the reason.

ONNX: the artifact's deploy form is exported (:mod:`compsearch.exports.onnx`) to a temporary file
beside the target, run in ONNX Runtime on the task's example inputs and a training batch, and
compared with the PyTorch deploy form: the relative error of the outputs (‖ONNX − PyTorch‖ /
‖PyTorch‖) must be within :data:`TOLERANCE` (see there: tight for float compute, a gross-error
bound where int8 levels are involved) for the file to be published. The task's metrics on
the test split, from both, go in the report beside it (``<name>.json``), with each layer's ONNX
form and both files' bytes. A file that fails the check is not written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compsearch._files import write_text_atomic
from compsearch.errors import ExportError
from compsearch.tasks.base import Task

FORMATS = ("onnx", "compressed-tensors", "gguf")
DEFAULT_OUT = {"onnx": "model.onnx", "compressed-tensors": "compressed-tensors",
               "gguf": "model.gguf"}  # fmt: skip
#: relative output error allowed. Float compute differs by summation order only. Where int8 levels
#: are involved (static int8 inputs, or ONNX Runtime's MatMulNBits quantizing its inputs itself),
#: a value on a rounding boundary lands on either side in two runtimes, and the flips compound
#: with depth: measured on minilm (w8a8 PTQ, 6 layers), ONNX Runtime differs from PyTorch by 12 %
#: at the last hidden state — and PyTorch's own matmul against its linear, on the same levels, by
#: 9 %. There the check catches gross errors (a wrong layout or scale differs by 100 % or more),
#: and the task metric from both runtimes, in the report, is the comparison that matters.
TOLERANCE = {"float": 1e-4, "integer": 0.25}


@dataclass(frozen=True)
class ModelExport:
    path: Path
    format: str
    size_bytes: int
    artifact_bytes: int
    relative_error: float
    tolerance: float
    metrics_torch: dict[str, float]
    metrics_served: dict[str, float]
    forms: dict[str, str]
    kernels: dict[str, str]


@dataclass(frozen=True)
class CheckpointExport:
    """A checkpoint format's export: every tensor read back equal to compsearch's (checked)."""

    path: Path
    format: str
    size_bytes: int
    artifact_bytes: int
    layers: dict[str, str]  # tensor or layer -> how it is stored
    notes: list[str]


def output_error(task: Task, reference: torch.nn.Module, served: torch.nn.Module,
                 batches: list) -> float:  # fmt: skip
    """The largest relative error ‖served − reference‖ / ‖reference‖ of the task's outputs."""
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = task.forward(reference, batch).main.float()
            got = task.forward(served, batch).main.float()
            scale = float(expected.norm()) or 1.0
            worst = max(worst, float((got - expected).norm()) / scale)
    return worst


def export_model(path: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None,
                 task: str | Task | None = None, trust_task: bool = False,
                 threads: int = 2) -> ModelExport | CheckpointExport:  # fmt: skip
    """Write the artifact at ``path`` (a ``model.safetensors`` or its folder) as ``format``; ``out``
    defaults to ``model.onnx``, ``compressed-tensors/`` or ``model.gguf`` beside it.
    ``task``/``trust_task`` as in :func:`compsearch.final.task_for` (or a Task itself)."""
    from compsearch.exports.onnx import OnnxRuntimeModel, export_onnx, require_onnx
    from compsearch.final import artifact_recipe, resolve, task_for
    from compsearch.pipeline import rebuild

    if format not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, but got {format!r}.")
    artifact = resolve(path)
    target = Path(out) if out is not None else artifact.parent / DEFAULT_OUT[format]
    suffix = {"onnx": ".onnx", "gguf": ".gguf"}.get(format)
    if suffix is not None and target.suffix != suffix:
        raise ExportError(f"out: expected a file name ending in {suffix}, but got {str(target)!r}.")
    if format == "onnx":
        require_onnx()
    if isinstance(task, Task):
        the_task = task
    else:
        the_task = task_for(artifact_recipe(artifact), task, trust_task)
    if format != "onnx":
        return _export_checkpoint(artifact, format, target, the_task)
    deployed, _, _ = rebuild(the_task, artifact, "cpu")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        exported = export_onnx(deployed, the_task, Path(scratch) / target.name)
        served = OnnxRuntimeModel(exported, threads)
        batches = [the_task.example_inputs(), the_task.calibration_batches(1)[0]]
        error = output_error(the_task, deployed, served, batches)
        quantized_inputs = any("int8 inputs" in form for form in exported.forms.values())
        integer = quantized_inputs or exported.integer_layers
        tolerance = TOLERANCE["integer" if integer else "float"]
        if not error <= tolerance:
            raise ExportError(
                f"expected ONNX Runtime's outputs within {tolerance:g} (relative) of the PyTorch "
                f"deploy form's, but they differ by {error:.3g}; nothing was written. Please "
                "report it with the artifact."
            )
        with torch.no_grad():
            metrics_torch = the_task.evaluate(deployed, "test")
            metrics_served = the_task.evaluate(served, "test")
        os.replace(exported.path, target)
    result = ModelExport(target, format, target.stat().st_size, artifact.stat().st_size, error,
                         tolerance, metrics_torch, metrics_served, exported.forms,
                         exported.kernels)  # fmt: skip
    report = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    write_text_atomic(target.with_suffix(".json"), json.dumps(report, indent=2, sort_keys=True))
    return result


def _export_checkpoint(artifact: Path, format: str, target: Path, task: Task) -> CheckpointExport:
    from compsearch.exports.compressed_tensors import (
        export_compressed_tensors,
        require_compressed_tensors,
    )
    from compsearch.exports.gguf_file import export_gguf
    from compsearch.kernels.packing import read_packed

    if format == "compressed-tensors":
        require_compressed_tensors()
    packed, _ = read_packed(artifact)
    teacher = task.teacher()
    if format == "gguf":
        done = export_gguf(task, teacher, packed, target)
        result = CheckpointExport(done.path, format, done.size_bytes, artifact.stat().st_size,
                                  done.types, [])  # fmt: skip
    else:
        done = export_compressed_tensors(task, teacher, packed, target)
        result = CheckpointExport(done.folder, format, done.size_bytes, artifact.stat().st_size,
                                  done.schemes, done.notes)  # fmt: skip
    report = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    write_text_atomic(target.with_name(target.name + ".json"),
                      json.dumps(report, indent=2, sort_keys=True))  # fmt: skip
    return result
