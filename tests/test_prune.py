import copy

import pytest
import torch
from torch import nn
from zoo import NAMES, build

from compsearch.errors import KernelError
from compsearch.kernels.prune import (
    PruneRecord,
    analyze,
    kept_count,
    prune_,
    replay_,
    taylor_gradients,
    zero_removed_,
)
from compsearch.recipes import LayerPlan, Recipe
from compsearch.tasks.models import ResNet


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def expected_params(model: nn.Module, analysis, decisions) -> int:
    """Parameter count after pruning, from the groups' members and the kept counts (a tied tensor
    is named in each module that holds it, and cut once per dimension)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    sizes = {id(t): list(t.shape) for t in named.values()}
    cut = set()
    for name, kept in decisions.items():
        group = analysis.groups[name]
        removed = group.size - kept
        for member, width in group.members:
            tensor = named.get(member.key)
            if tensor is not None and (id(tensor), member.dim, member.offset) not in cut:
                cut.add((id(tensor), member.dim, member.offset))
                sizes[id(tensor)][member.dim] -= removed * width
    total = 0
    for shape in sizes.values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


@pytest.fixture(scope="module", params=NAMES)
def zoo_model(request):
    model, run = build(request.param)
    return request.param, model.eval(), run


def test_keep_ratio_one_changes_nothing(zoo_model):
    name, model, run = zoo_model
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = run(model)
    analysis = analyze(model, run)
    plans = {g.name: LayerPlan(keep_ratio=1.0) for g in analysis.groups.values() if g.prunable}
    record, report = prune_(model, plans, run)
    assert report.pruned == {}
    with torch.no_grad():
        assert torch.equal(run(model), before)


def test_half_of_every_group_runs_keeps_shapes_and_shrinks_as_expected(zoo_model):
    name, model, run = zoo_model
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = run(model)
    analysis = analyze(model, run)
    prunable = [g for g in analysis.groups.values() if g.prunable]
    assert prunable, f"{name}: nothing prunable"
    plans = {g.name: LayerPlan(keep_ratio=0.5) for g in prunable}
    record, report = prune_(model, plans, run)
    assert set(report.pruned) == {g.name for g in prunable}, "every asked group is pruned"
    kept = {n: k for n, (k, _) in report.pruned.items()}
    predicted = expected_params(copy.deepcopy(build(name)[0]), analysis, kept)
    assert params(model) == predicted
    assert params(model) < params(build(name)[0])
    with torch.no_grad():
        after = run(model)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()


def test_pruning_inside_blocks_equals_zeroing_the_removed_weights(zoo_model):
    name, model, run = zoo_model
    model = copy.deepcopy(model)
    analysis = analyze(model, run)
    inner = [g for g in analysis.groups.values() if g.prunable and g.kind != "stream"]
    assert inner, f"{name}: no prunable group inside blocks"
    plans = {g.name: LayerPlan(keep_ratio=0.5) for g in inner}
    reference = copy.deepcopy(model)
    record, _ = prune_(model, plans, run)
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        expected, actual = run(reference), run(model)
    assert relative_error(actual, expected) < 1e-4


def test_replaying_the_record_on_a_fresh_model_loads_strictly(zoo_model):
    name, model, run = zoo_model
    model = copy.deepcopy(model)
    analysis = analyze(model, run)
    plans = {g.name: LayerPlan(keep_ratio=0.5) for g in analysis.groups.values() if g.prunable}
    if analysis.blocks:
        plans[next(iter(analysis.blocks))] = LayerPlan(keep=False)
    record, report = prune_(model, plans, run)
    fresh, fresh_run = build(name)
    fresh.eval()
    replay_(fresh, PruneRecord.from_dict(record.to_dict()), fresh_run)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh_run(fresh), run(model), atol=1e-6)


def test_grouped_query_heads_move_with_their_key_value_head():
    model, run = build("llama")
    model.eval()
    analysis = analyze(model, run)
    heads = analysis.groups["model.layers.0.self_attn"]
    assert heads.kind == "heads" and heads.size == 2 and heads.q_per_kv == 4
    reference = copy.deepcopy(model)
    record, _ = prune_(model, {"model.layers.0.self_attn": LayerPlan(keep_ratio=0.5)}, run)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 4 * 8  # 4 query heads of one kv group, head_dim 8
    assert attention.k_proj.out_features == 8
    assert attention.o_proj.in_features == 32
    (kept,) = record.groups["model.layers.0.self_attn"]["kept"]
    # the query heads kept are exactly the four that read the kept key/value head
    q_rows = reference.model.layers[0].self_attn.q_proj.weight[kept * 32 : (kept + 1) * 32]
    assert torch.equal(attention.q_proj.weight, q_rows)
    zero_removed_(reference, analyze(reference, run), {heads.name: torch.tensor([kept])})
    with torch.no_grad():
        assert relative_error(run(model), run(reference)) < 1e-4, "pruned == removed heads zeroed"
        prompt = torch.randint(3, 99, (1, 5))
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


def test_mnist_resnet_groups_and_depth_pruning():
    model = ResNet((16, 32, 64), (2, 2, 2), stem_stride=2).eval()
    x = torch.randn(2, 1, 28, 28)

    def run(m):
        return m(x)

    analysis = analyze(model, run)
    stream = analysis.groups["conv1"]
    assert stream.kind == "stream"
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv1"} <= set(stream.layers)
    assert set(analysis.blocks) == {"layer1.0", "layer1.1", "layer2.1", "layer3.1"}
    assert analysis.output_layers == {"fc"}
    before = params(model)
    record, report = prune_(model, {"layer2.1": LayerPlan(keep=False)}, run)
    assert report.dropped_blocks == ["layer2.1"]
    assert type(model.layer2[1]).__name__ == "SkippedBasicBlock"
    assert params(model) < before
    assert run(model).shape == (2, 10)


def test_rounding_of_kept_channels():
    assert kept_count(64, 0.5, 8) == 32
    assert kept_count(64, 0.3, 8) == 16  # 19.2 -> nearest multiple of 8
    assert kept_count(64, 0.01, 8) == 8  # never below one multiple
    assert kept_count(12, 0.5, 8) == 6  # too narrow to round to 8
    assert kept_count(4, 0.5, 8, heads=True) == 2


def test_importance_methods_choose_different_but_valid_channels():
    torch.manual_seed(0)
    base = ResNet((16, 32, 64), (1, 1, 1), stem_stride=2).eval()
    x = torch.randn(8, 1, 28, 28)
    labels = torch.randint(0, 10, (8,))

    def run(m):
        return m(x)

    chosen = {}
    for method in ("l1", "l2", "random", "taylor"):
        model = copy.deepcopy(base)
        grads = None
        if method == "taylor":
            grads = taylor_gradients(
                model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, labels)]
            )
        record, _ = prune_(
            model, {"layer1.0.conv1": LayerPlan(keep_ratio=0.5)}, run, method, grads=grads
        )
        kept = record.groups["layer1.0.conv1"]["kept"]
        assert len(kept) == 8 and kept == sorted(set(kept)) and kept[0] >= 0 and kept[-1] < 16
        chosen[method] = tuple(kept)
    assert len({chosen["l1"], chosen["random"], chosen["taylor"]}) == 3, (
        f"the methods should disagree somewhere: {chosen}"
    )


def test_l1_keeps_the_largest_channels():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(16).float().unsqueeze(1).repeat(1, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)  # the consumer's columns score alike
    x = torch.randn(3, 4)
    record, _ = prune_(model, {"0": LayerPlan(keep_ratio=0.5)}, lambda m: m(x), round_to=1)
    assert record.groups["0"]["kept"] == list(range(8, 16))


def test_bad_requests_fail_before_the_model_is_touched():
    model = ResNet((16, 32, 64), (1, 1, 1), stem_stride=2).eval()
    x = torch.randn(2, 1, 28, 28)
    state = copy.deepcopy(model.state_dict())

    def run(m):
        return m(x)

    cases = [
        ({"fc": LayerPlan(keep_ratio=0.5)}, "it is an output layer"),
        ({"layer1.0.conv2": LayerPlan(keep_ratio=0.5)}, "expected the keep_ratio on 'conv1'"),
        ({"layer9.conv": LayerPlan(keep_ratio=0.5)}, "no group is anchored there"),
        ({"layer2.0": LayerPlan(keep=False)}, "expected a residual block that can be dropped"),
    ]
    for plans, message in cases:
        with pytest.raises(KernelError, match=message):
            prune_(model, plans, run)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KernelError, match="importance: expected one of"):
        prune_(model, {"conv1": LayerPlan(keep_ratio=0.5)}, run, method="magnitude")
    with pytest.raises(KernelError, match="expected gradients"):
        prune_(model, {"conv1": LayerPlan(keep_ratio=0.5)}, run, method="taylor")
    with pytest.raises(Exception, match=r"keep_ratio: expected a number in \(0.0, 1.0\]"):
        Recipe.from_dict({"version": 1, "layers": {"conv1": {"keep_ratio": 1.5}}})


def test_pattern_asking_for_unprunable_groups_reports_them():
    model, run = build("bert")
    model.eval()
    record, report = prune_(model, Recipe(layers={"re:.*": LayerPlan(keep_ratio=0.5)}), run)
    assert report.skipped["classifier"] == "reaches the model output"
    assert "bert.embeddings.word_embeddings" in report.pruned  # the hidden width
    assert "bert.encoder.layer.0.attention.self" in report.pruned


def test_progressive_records_compose():
    model = ResNet((16, 32, 64), (1, 1, 1), stem_stride=2).eval()
    x = torch.randn(2, 1, 28, 28)

    def run(m):
        return m(x)

    first, _ = prune_(model, {"layer3.0.conv1": LayerPlan(keep_ratio=0.5)}, run, round_to=1)
    second, _ = prune_(model, {"layer3.0.conv1": LayerPlan(keep_ratio=0.5)}, run, round_to=1)
    both = first.then(second)
    assert len(both.groups["layer3.0.conv1"]["kept"]) == 16
    assert set(both.groups["layer3.0.conv1"]["kept"]) <= set(first.groups["layer3.0.conv1"]["kept"])
    fresh = ResNet((16, 32, 64), (1, 1, 1), stem_stride=2).eval()
    replay_(fresh, both, run)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_quantized_model_can_be_pruned_afterwards():
    from compsearch.kernels.observers import calibrate
    from compsearch.kernels.quant import QuantConv2d, quantize_

    model = ResNet((16, 32, 64), (1, 1, 1), stem_stride=2).eval()
    x = torch.randn(4, 1, 28, 28)

    def run(m):
        return m(x)

    quantize_(model, Recipe(layers={"re:.*conv.*": LayerPlan(w_bits=4, a_bits=8)}))
    calibrate(model, [x], lambda m, b: m(b))
    prune_(model, {"layer2.0.conv1": LayerPlan(keep_ratio=0.5)}, run)
    conv = model.layer2[0].conv1
    assert isinstance(conv, QuantConv2d) and conv.out_channels == 16
    assert conv.weight_quant.clip.shape[0] == 16
    assert run(model).shape == (4, 10)
