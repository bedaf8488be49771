"""Mixture-of-experts layers: fused (experts, out, in) matrices are quantized expert by expert, per
output channel or group, stored packed, and deployed; a search space offers them as one unit."""

import copy

import pytest
import torch
from torch import nn
from zoo import build

from compsearch.errors import KernelError
from compsearch.kernels._bits import packed_nbytes
from compsearch.kernels.deploy import build_deploy, to_deploy
from compsearch.kernels.packing import export_packed, read_packed, save_packed
from compsearch.kernels.quant import (
    QuantLinear,
    quantize_,
    quantized_weights,
    spec_from_plan,
    stacked_modules,
)
from compsearch.recipes import LayerPlan, Recipe

PLAN = LayerPlan(w_bits=4, granularity="per_group", group_size=32)


def test_each_expert_is_quantized_like_a_linear_of_its_own():
    model, run = build("mixtral")
    quantize_(model, Recipe(layers={"re:.*experts": PLAN}))
    experts = stacked_modules(model)["model.layers.0.mlp.experts"]
    assert type(experts).__name__ == "QuantMixtralExperts" and experts.stacked == (
        "gate_up_proj", "down_proj")  # fmt: skip
    for param in experts.stacked:
        stack = experts._parameters[param]
        quantized = experts.quantized_param(param).detach()
        for index in (0, 3):
            linear = nn.Linear(stack.shape[2], stack.shape[1], bias=False)
            linear.weight = nn.Parameter(stack[index].detach().clone())
            single = QuantLinear.__new__(QuantLinear)
            single.__dict__ = linear.__dict__.copy()
            single._setup(spec_from_plan(PLAN))
            assert torch.equal(quantized[index], single.quantized_weight().detach())
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
            for p in ("gate_up_proj", "down_proj")} <= quantized_weights(model)  # fmt: skip


def test_the_experts_forward_sees_the_quantized_matrices():
    model, run = build("mixtral")
    model.eval()
    fake = copy.deepcopy(model)
    quantize_(fake, Recipe(layers={"re:.*experts": LayerPlan(w_bits=2)}))
    with torch.no_grad():
        expected, quantized = run(model), run(fake)
    assert not torch.equal(quantized, expected)
    experts = fake.model.layers[0].mlp.experts
    inputs = torch.randn(5, 64)
    index = torch.tensor([[0, 1]] * 5)
    weights = torch.full((5, 2), 0.5)
    with torch.no_grad():
        manual = copy.deepcopy(model.model.layers[0].mlp.experts)
        for param in experts.stacked:
            manual._parameters[param] = experts.quantized_param(param)
        assert torch.equal(experts(inputs, index, weights), manual(inputs, index, weights))


def test_experts_round_trip_through_the_artifact_and_the_deploy_form(tmp_path):
    model, run = build("mixtral")
    model.eval()
    quantize_(model, Recipe(layers={"re:.*experts": PLAN}))
    with torch.no_grad():
        fake = run(model)
    path = save_packed(export_packed(model), tmp_path / "moe.safetensors")
    packed, _ = read_packed(path)
    stack = packed.weights["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.stacked and stack.shape == (4, 256, 64)
    experts, gate_up = 4 * 256, 64
    assert stack.data.numel() == packed_nbytes(experts * gate_up, 4)  # 4 bits each, packed
    assert stack.scale.shape == (experts, gate_up // 32)
    skeleton, _ = build("mixtral")  # a float model of the architecture, as a rebuild makes
    deployed, report = build_deploy(skeleton, packed, "cpu", run)
    assert report.kernels["model.layers.0.mlp.experts.gate_up_proj"] == "dequant"
    with torch.no_grad():
        assert torch.equal(run(deployed), fake), "the artifact computes what was trained"
        assert torch.equal(run(to_deploy(model, "cpu", run)[0]), fake)


def test_a_group_size_that_does_not_divide_the_experts_is_refused_before_any_change():
    model, _ = build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KernelError, match="divides the experts' input features"):
        quantize_(model, Recipe(layers={"model.layers.0.mlp.experts": LayerPlan(
            w_bits=4, granularity="per_group", group_size=256)}))  # fmt: skip
    assert not stacked_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_search_space_offers_the_experts_as_weight_only_choices():
    from compsearch.spaces.discover import discover

    model, run = build("mixtral")

    class Task:  # what discover reads from a task
        name = "moe"

        def calibration_batches(self, count):
            return [None]

        def forward(self, m, batch):
            return run(m)

        def regions(self, m):
            return {}

    info = discover(Task(), model.eval())
    assert info.layers["model.layers.0.mlp.experts"] == "experts"
    assert info.fan_in["model.layers.0.mlp.experts"] == 64  # gcd of 64 (gate_up) and 128 (down)
