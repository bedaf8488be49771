"""``compsearch export-model runs/<study>/final/<name> --format onnx|compressed-tensors|gguf``: the
artifact in a serving format, checked by that format's runtime or library before it is written
(see compsearch.exports.artifact)."""

from __future__ import annotations

import argparse

from compsearch.exports.artifact import DEFAULT_OUT, FORMATS, CheckpointExport, export_model
from compsearch.objectives.constraints import format_bytes


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export-model",
        help="write an artifact as ONNX, compressed-tensors or GGUF, checked by its own library",
    )
    parser.add_argument("path", help="a final run's folder or its model.safetensors")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="the serving format")
    defaults = ", ".join(DEFAULT_OUT.values())
    parser.add_argument("--out", help=f"where to write (default beside the artifact: {defaults})")
    parser.add_argument("--task", help="the task to rebuild the model with (default: the recipe's)")
    parser.add_argument("--trust-task", action="store_true",
                        help="let the artifact's own task name be imported or fetched")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime's CPU threads")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = export_model(args.path, args.format, args.out, args.task, args.trust_task,
                          args.threads)  # fmt: skip
    if isinstance(result, CheckpointExport):
        print(f"{result.path}: {format_bytes(result.size_bytes)} (artifact "
              f"{format_bytes(result.artifact_bytes)}); every tensor loads back exactly as "
              f"compsearch stores it ({len(result.layers)} checked)")  # fmt: skip
        for note in result.notes:
            print(f"  note: {note}")
        print(f"  report: {result.path.with_name(result.path.name + '.json')}")
        return 0
    integer = sum(not kernel.startswith("float") for kernel in result.kernels.values())
    print(f"{result.path}: {format_bytes(result.size_bytes)} (artifact "
          f"{format_bytes(result.artifact_bytes)}); {integer} of {len(result.forms)} quantized "
          f"layers on ONNX Runtime integer kernels; outputs within {result.relative_error:.2g} "
          f"of PyTorch's (allowed {result.tolerance:g})")  # fmt: skip
    for name in sorted(result.metrics_served):
        print(f"  {name} (test split): ONNX Runtime {result.metrics_served[name]:.4f}, "
              f"PyTorch {result.metrics_torch[name]:.4f}")  # fmt: skip
    print(f"  report: {result.path.with_suffix('.json')}")
    return 0
