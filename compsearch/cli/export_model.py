"""``compsearch export-model runs/<study>/final/<name> --format onnx``: the artifact in a serving
format, checked by that format's runtime before it is written (see compsearch.exports.artifact)."""

from __future__ import annotations

import argparse

from compsearch.exports.artifact import FORMATS, export_model
from compsearch.objectives.constraints import format_bytes


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export-model", help="write an artifact as ONNX, checked by ONNX Runtime"
    )
    parser.add_argument("path", help="a final run's folder or its model.safetensors")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="the serving format")
    parser.add_argument("--out", help="the file to write (default: model.onnx beside the artifact)")
    parser.add_argument("--task", help="the task to rebuild the model with (default: the recipe's)")
    parser.add_argument("--trust-task", action="store_true",
                        help="let the artifact's own task name be imported or fetched")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime's CPU threads")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = export_model(args.path, args.format, args.out, args.task, args.trust_task,
                          args.threads)  # fmt: skip
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
