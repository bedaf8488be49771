"""``compsearch formats [--device cpu|cuda]``: which quantized formats run on real low-precision
kernels on a device, and which are stored packed but computed in float."""

from __future__ import annotations

import argparse

from compsearch.kernels.deploy import deploy_table


def add_parser(commands) -> None:
    parser = commands.add_parser("formats", help="show the deploy table of a device")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.set_defaults(handler=run)


LEGEND = """kernels:
  onednn_qlinear  oneDNN int8 GEMM, activations quantized with calibrated static scales (CPU)
  int_mm          torch._int_mm int8 GEMM, activations quantized per token at run time
  fp8_scaled_mm   torch._scaled_mm on float8 weights and activations (GPUs that have it)
  int8_gather     int8 table rows gathered, then scaled (embeddings)
  dequant         the weight is stored packed (the file is that small) and expanded to float once
                  at load; the layer computes in float, so the format saves size, not time
fast = runs on a real low-precision kernel on this device. Convolutions compute in float on every
device here (torch has no int8 convolution outside the deprecated torch.ao); they get faster from
pruning, BN folding and channels-last memory, and smaller from any format."""


def run(args: argparse.Namespace) -> int:
    print(f"{'layer':10s} {'w_bits':6s} {'format':6s} {'a_bits':6s} {'granularity':28s} kernel")
    for row in deploy_table(args.device):
        speed = "fast" if row.fast else "size only (float compute)"
        print(
            f"{row.layer:10s} {row.w_bits:6s} {row.w_format:6s} {row.a_bits!s:6s} "
            f"{row.granularity:28s} {row.kernel} — {speed}"
        )
    print()
    print(LEGEND)
    return 0
