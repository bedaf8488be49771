"""``compsearch formats [--device cpu|cuda]``: which quantized formats run on real low-precision
kernels on a device, and which are stored packed but computed in float."""

from __future__ import annotations

import argparse

from compsearch.kernels.deploy import deploy_table


def add_parser(commands) -> None:
    parser = commands.add_parser("formats", help="show the deploy table of a device")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(f"{'layer':10s} {'w_bits':6s} {'format':6s} {'a_bits':6s} {'granularity':28s} kernel")
    for row in deploy_table(args.device):
        speed = "fast" if row.fast else "size only (float compute)"
        print(
            f"{row.layer:10s} {row.w_bits:6s} {row.w_format:6s} {row.a_bits!s:6s} "
            f"{row.granularity:28s} {row.kernel} — {speed}"
        )
    return 0
