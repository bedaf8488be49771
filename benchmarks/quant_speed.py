"""Deploy-form speed of a BERT-shaped FFN (768 → 3072 → 768): float vs the int8 / low-bit formats.

Side by side in one run, median of repeated runs, 2 CPU threads (and CUDA when present). Every
variant goes through the same path a search trial takes: quantize_ → calibrate → to_deploy.
Run: python benchmarks/quant_speed.py [--runs 20] [--only cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import header, median_ms, table
from torch import nn

from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.observers import calibrate
from compsearch.kernels.quant import quantize_
from compsearch.recipes import LayerPlan


class FFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(768, 3072)
        self.act = nn.GELU()
        self.down = nn.Linear(3072, 768)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


VARIANTS = {
    "w8a8 static (per-tensor)": (LayerPlan(w_bits=8, a_bits=8), "static"),
    "w8a8 dynamic (per-token)": (LayerPlan(w_bits=8, a_bits=8), "dynamic"),
    "w4a8 static": (LayerPlan(w_bits=4, a_bits=8), "static"),
    "w4 per-group-128, a16": (LayerPlan(w_bits=4, group_size=128), "static"),
}


def deploy_variant(model, plan, mode, x, device):
    qat = copy.deepcopy(model)
    quantize_(qat, {"up": plan, "down": plan}, activation_mode=mode)
    calibrate(qat, [x], lambda m, b: m(b))
    deployed, report = to_deploy(qat, device=device, run=lambda m: m(x.to(device)))
    kernel = report.kernels["up"] + (" + fused GELU" if report.chains else "")
    return deployed, kernel


def cpu_rows(runs: int) -> list[list[object]]:
    torch.manual_seed(0)
    model = FFN().eval()
    rows = []
    for tokens in (4096, 128, 1):
        x = torch.randn(tokens, 768)
        with torch.inference_mode():
            base = median_ms(lambda m=model, x=x: m(x), runs)
            rows.append([tokens, "fp32", "float", base, 1.0])
            calibration = torch.randn(max(tokens, 256), 768)
            for name, (plan, mode) in VARIANTS.items():
                deployed, kernel = deploy_variant(model, plan, mode, calibration, "cpu")
                ms = median_ms(lambda d=deployed, x=x: d(x), runs)
                rows.append([tokens, name, kernel, ms, base / ms])
    return rows


def cuda_rows(runs: int) -> list[list[object]]:
    from compsearch.kernels.capture import capture

    torch.manual_seed(0)
    model = FFN().eval()
    rows = []
    variants = {
        "w8a8 int8 (_int_mm)": (LayerPlan(w_bits=8, a_bits=8), "dynamic"),
        "w8a8 fp8 (_scaled_mm)": (LayerPlan(w_bits=8, a_bits=8, w_format="fp8"), "dynamic"),
    }
    for tokens in (4096, 128, 1):
        x = torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            base_model = copy.deepcopy(model).cuda().to(torch.bfloat16)
            captured = capture(base_model, x)
            base = median_ms(lambda c=captured, x=x: c(x), runs, cuda=True)
            rows.append([tokens, "bf16", "cuBLAS, CUDA graph", base, 1.0])
            for name, (plan, mode) in variants.items():
                deployed, kernel = deploy_variant(model, plan, mode, x.float().cpu(), "cuda")
                captured = capture(deployed, x)
                ms = median_ms(lambda c=captured, x=x: c(x), runs, cuda=True)
                rows.append([tokens, name, kernel + ", CUDA graph", ms, base / ms])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("cpu", "cuda"), help="one device's table")
    args = parser.parse_args()
    if args.only == "cuda" and not torch.cuda.is_available():
        parser.error("--only cuda: expected a CUDA device, but torch sees none")
    torch.set_num_threads(args.threads)
    header("Quantized deploy forms: BERT-shaped FFN 768→3072→768")
    columns = ["tokens", "format", "kernel", "median ms", "speed-up vs float"]
    if args.only != "cuda":
        table(columns, cpu_rows(args.runs))
    if args.only != "cpu" and torch.cuda.is_available():
        print("CUDA (bf16 baseline; every variant captured in a CUDA graph):\n")
        table(columns, cuda_rows(args.runs))


if __name__ == "__main__":
    main()
