import copy

import torch
from torch import nn

from compsearch.kernels.observers import calibrate
from compsearch.kernels.quant import quantize_
from compsearch.kernels.smooth import smooth_
from compsearch.recipes import LayerPlan


class Block(nn.Module):
    """A normalization feeding two projections (like q and k), then a layer no norm feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q = nn.Linear(64, 64)
        self.k = nn.Linear(64, 64)
        self.out = nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.q(h) + self.k(h)))


def _model_and_batches():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.norm.weight[:4] = 40.0  # a few outlier channels, as transformers have
    return model, [torch.randn(8, 16, 64) for _ in range(4)]


def _run(model, batch):
    return model(batch)


def test_smoothing_flattens_the_activation_channels_and_leaves_the_float_output_unchanged():
    model, batches = _model_and_batches()
    reference = model(batches[1]).detach()
    report = smooth_(model, {"q": 0.5, "k": 0.5, "out": 0.5}, batches, _run)
    assert report.groups == {"norm": ["k", "q"]}
    assert report.spread_before["norm"] > 20
    assert report.spread_after["norm"] < report.spread_before["norm"] / 5
    assert "normalization layer" in report.skipped["out"]
    out = model(batches[1]).detach()
    assert float((out - reference).norm() / reference.norm()) < 1e-5


def _w8a8_error(model, batches) -> float:
    reference = model(batches[-1]).detach()
    plan = LayerPlan(w_bits=8, a_bits=8)
    quantize_(model, {"q": plan, "k": plan})
    calibrate(model, batches[:3], _run)
    out = model(batches[-1]).detach()
    return float((out - reference).norm() / reference.norm())


def test_smoothing_makes_static_int8_activations_more_accurate():
    model, batches = _model_and_batches()
    plain = _w8a8_error(copy.deepcopy(model), batches)
    smooth_(model, {"q": 0.5, "k": 0.5}, batches, _run)
    smoothed = _w8a8_error(model, batches)
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_compress_smooths_the_layers_whose_plan_asks_and_says_so(digits_task):
    from compsearch.pipeline import compress
    from compsearch.recipes import FinetuneBudget, Recipe

    recipe = Recipe(layers={"re:fc.*": LayerPlan(w_bits=8, a_bits=8, smooth=0.5),
                            "features.0": LayerPlan(w_bits=8, smooth=0.5)},
                    finetune=FinetuneBudget(steps=0))  # fmt: skip
    skipped = compress(digits_task, recipe).quant_report.skipped
    # the digits CNN has no normalization layer before its fc layers; features.0 is a convolution
    assert (
        "normalization layer" in skipped["fc1:smooth"] and "normalization" in skipped["fc2:smooth"]
    )
    assert "takes a Linear layer with int8 activations" in skipped["features.0:smooth"]


def _w4_error(model, batches) -> float:
    reference = model(batches[-1]).detach()
    plan = LayerPlan(w_bits=4, group_size=32)
    quantize_(model, {"q": plan, "k": plan})
    out = model(batches[-1]).detach()
    return float((out - reference).norm() / reference.norm())


def test_awq_scales_reduce_the_quantized_output_error_and_keep_the_float_output():
    from compsearch.kernels.awq import awq_
    from compsearch.kernels.quant import spec_from_plan

    model, batches = _model_and_batches()  # four input channels 40x the others: the salient ones
    plain = _w4_error(copy.deepcopy(model), batches)
    reference = model(batches[1]).detach()
    spec = spec_from_plan(LayerPlan(w_bits=4, group_size=32))
    report, found = awq_(model, {"q": spec, "k": spec, "out": spec}, batches[:3], _run)
    assert report.groups == {"norm": ["k", "q"]} and "normalization layer" in report.skipped["out"]
    alpha, rtn_error, awq_error = found["q"]
    assert alpha > 0 and awq_error < rtn_error
    out = model(batches[1]).detach()
    assert float((out - reference).norm() / reference.norm()) < 1e-5
    scaled = _w4_error(model, batches)  # on a batch the search did not see: not worse
    assert scaled < 1.01 * plain, (scaled, plain)
