"""Does pruning make models faster? MACs ratio (a proxy) beside measured CPU latency ratio.

Models: the ``mnist`` ResNet (batch 256) and a BERT-base-shaped encoder (hidden 768, 12 heads,
FFN 3072; 4 layers to keep the run short; batch 4 × 128 tokens), plus the BERT FFN block alone on
4096 tokens. Variants: keep 0.75 / 0.5 / 0.25 of every prunable group (and, for BERT, of the FFN
neurons only and of the heads only), and depth pruning (half the droppable blocks).
Run: python benchmarks/prune_speed.py [--runs 15]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import header, median_ms, table
from torch import nn

from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.prune import analyze, prune_
from compsearch.objectives.proxies import count_macs
from compsearch.recipes import LayerPlan
from compsearch.tasks.models import ResNet


def bert(layers: int = 4):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                        num_hidden_layers=layers, vocab_size=30522)  # fmt: skip
    return BertModel(config).eval()


def measure(name, model, run, variants, runs):
    """Latency of each variant's deploy form (BN folded, channels-last for convs: what ships)."""
    rows = []
    shipped, _ = to_deploy(model, run=run)
    with torch.inference_mode():
        base_ms = median_ms(lambda: run(shipped), runs)
    base_macs = count_macs(model, run)
    rows.append([name, "unpruned", 1.0, 1.0, base_ms])
    for label, plans_of in variants:
        pruned = copy.deepcopy(model)
        analysis = analyze(pruned, run)
        prune_(pruned, plans_of(analysis), run)
        shipped, _ = to_deploy(pruned, run=run)
        with torch.inference_mode():
            ms = median_ms(lambda p=shipped: run(p), runs)
        macs = count_macs(pruned, run)
        rows.append([name, label, base_macs / macs, base_ms / ms, ms])
    return rows


def every(kinds, ratio):
    def plans(analysis):
        return {g.name: LayerPlan(keep_ratio=ratio) for g in analysis.groups.values()
                if g.prunable and g.kind in kinds}  # fmt: skip

    return plans


def half_the_blocks(analysis):
    blocks = list(analysis.blocks)
    return {name: LayerPlan(keep=False) for name in blocks[1::2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    header("Pruning: MACs ratio (proxy) vs measured latency ratio, CPU")
    rows = []
    all_kinds = ("channels", "stream", "heads")

    resnet = ResNet((16, 32, 64), (2, 2, 2), stem_stride=2).eval()
    images = torch.randn(256, 1, 28, 28)
    variants = [(f"keep {r} (all groups)", every(all_kinds, r)) for r in (0.75, 0.5, 0.25)]
    variants.append(("depth: drop half the blocks", half_the_blocks))
    rows += measure("mnist ResNet, batch 256", resnet, lambda m: m(images), variants, args.runs)

    encoder = bert()
    ids = torch.randint(1000, 30000, (4, 128))
    variants = []
    for r in (0.75, 0.5, 0.25):
        variants.append((f"keep {r}: FFN neurons", every(("channels",), r)))
        variants.append((f"keep {r}: heads", every(("heads",), r)))
        variants.append((f"keep {r}: FFN + heads + hidden", every(all_kinds, r)))
    variants.append(("depth: drop 2 of 4 layers", half_the_blocks))
    rows += measure("BERT-base-shaped, 4 layers, 4×128", encoder, lambda m: m(input_ids=ids),
                    variants, args.runs)  # fmt: skip

    ffn = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()
    tokens = torch.randn(4096, 768)
    variants = [(f"keep {r}: neurons", every(("channels",), r)) for r in (0.75, 0.5, 0.25)]
    rows += measure("BERT FFN block, 4096 tokens", ffn, lambda m: m(tokens), variants, args.runs)
    table(["model", "variant", "MACs ratio", "measured speed-up", "median ms"], rows)


if __name__ == "__main__":
    main()
