"""The kernels' run-time invariants: nothing silently wrong (the masked-equivalence check refuses a
prune it cannot vouch for; Quant layers keep a model's own layer classes), and transactional (a
kernel that raises leaves the model bit-identical)."""

import copy

import pytest
import torch
from torch import nn
from zoo import build

from compsearch.kernels import quant as quant_module
from compsearch.kernels._prune_groups import Group
from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.observers import calibrate
from compsearch.kernels.prune import analyze, prune_, zero_removed_
from compsearch.kernels.quant import QuantReport, quantize_
from compsearch.recipes import LayerPlan, Recipe


def snapshot(model):
    """Everything a kernel could change: classes, attributes that are plain values, tensors."""
    classes = [(name, type(m)) for name, m in model.named_modules()]
    values = [
        (name, key, value)
        for name, m in model.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, (int, float, str, bool, tuple)) and not key.startswith("_")
    ]
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    return classes, values, tensors


def assert_same(model, before):
    classes, values, tensors = snapshot(model)
    assert classes == before[0]
    assert values == before[1]
    assert tensors.keys() == before[2].keys()
    for key, tensor in tensors.items():
        assert torch.equal(tensor, before[2][key]), key


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_a_prune_that_raises_leaves_the_model_bit_identical(monkeypatch):
    """A block dropped, heads and MLP neurons pruned (their tensors replaced), then the hidden
    width fails half-way: everything is put back."""
    from compsearch.kernels import prune as prune_module

    model, run = build("llama")
    model.eval()
    analysis = analyze(model, run)
    plans = {g.name: LayerPlan(keep_ratio=0.5) for g in analysis.groups.values() if g.prunable}
    plans[next(iter(analysis.blocks))] = LayerPlan(keep=False)
    with torch.no_grad():
        expected = run(model)
    before = snapshot(model)
    sync, calls = prune_module._sync_attributes, []

    def fails_on_the_stream(model, analysis, decisions):
        sync(model, analysis, decisions)
        calls.append(sorted(decisions))
        if any(analysis.groups[n].kind == "stream" for n in decisions):
            raise RuntimeError("the stream broke")

    monkeypatch.setattr(prune_module, "_sync_attributes", fails_on_the_stream)
    with pytest.raises(RuntimeError, match="the stream broke"):
        prune_(model, plans, run)
    assert len(calls) >= 2, "the inner groups were applied before the stream failed"
    assert_same(model, before)
    with torch.no_grad():
        assert torch.equal(run(model), expected)


def test_a_quantize_that_raises_leaves_the_model_bit_identical(monkeypatch):
    model, run = build("gpt2")
    before = snapshot(model)
    convert, calls = quant_module._convert, []

    def fails_third(module, spec, shared):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("conversion broke")
        return convert(module, spec, shared)

    monkeypatch.setattr(quant_module, "_convert", fails_third)
    with pytest.raises(RuntimeError, match="conversion broke"):
        quantize_(model, Recipe(layers={"re:.*": LayerPlan(w_bits=4)}))
    assert len(calls) == 3
    assert_same(model, before)
    assert not quant_module.quant_modules(model)


def test_a_group_the_trace_got_wrong_is_refused_and_the_rest_is_pruned(monkeypatch):
    """Negative control of the check: the MLP's down projection is made to keep other columns than
    the rows its gate and up projections keep. The model runs, and is wrong; the check refuses."""
    model, run = build("llama")
    model.eval()
    analysis = analyze(model, run)
    mlp = "model.layers.0.mlp.gate_proj"
    assert analysis.groups[mlp].kind == "channels"
    indices = Group.indices

    def misread(self, member, width, units):
        found = indices(self, member, width, units)
        if self.name == mlp and member.role == "in":
            return (found + 1) % self.size
        return found

    monkeypatch.setattr(Group, "indices", misread)
    inner = [g.name for g in analysis.groups.values() if g.prunable and g.kind != "stream"]
    reference = copy.deepcopy(model)
    record, report = prune_(model, {name: LayerPlan(keep_ratio=0.5) for name in inner}, run)
    assert "masked-equivalence" in report.skipped[mlp] and "differs by" in report.skipped[mlp]
    assert mlp not in report.pruned and mlp not in record.groups
    assert model.model.layers[0].mlp.down_proj.in_features == 128  # left as it was
    assert set(report.pruned) == set(inner) - {mlp}
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    monkeypatch.setattr(Group, "indices", indices)
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        assert relative_error(run(model), run(reference)) < 1e-4


def test_t5_heads_are_pruned_together_across_the_layers_that_share_its_position_bias():
    """T5's per-head position bias is made once per stack (an Embedding) and reused by every
    layer's attention: the heads of those layers make one group, pruned together with the bias
    columns, and the pruned model equals the masked one."""
    model, run = build("t5")
    model.eval()
    analysis = analyze(model, run)
    encoder = analysis.groups["encoder.block.0.layer.0.SelfAttention"]
    assert encoder.prunable and encoder.attentions == (
        "encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention")  # fmt: skip
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert any(m.key == bias and m.dim == 1 for m, _ in encoder.members)
    prunable = [g.name for g in analysis.groups.values() if g.prunable]
    reference = copy.deepcopy(model)
    record, report = prune_(model, {name: LayerPlan(keep_ratio=0.5) for name in prunable}, run)
    assert not report.skipped and set(report.pruned) == set(prunable)
    for block in model.encoder.block:
        assert block.layer[0].SelfAttention.n_heads == 2
    assert (
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 2
    )
    inner = [n for n in prunable if analysis.groups[n].kind != "stream"]  # the masked reference
    pruned = copy.deepcopy(reference)
    record, _ = prune_(pruned, {n: LayerPlan(keep_ratio=0.5) for n in inner}, run)
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        assert relative_error(run(pruned), run(reference)) < 1e-4


def sqnr(actual, expected):
    return float(10 * torch.log10(expected.pow(2).mean() / (actual - expected).pow(2).mean()))


@pytest.mark.parametrize(
    ("name", "own"),
    [
        ("gemma", "GemmaTextScaledWordEmbedding"),  # forward: scaled by embed_scale
        ("opt", "OPTLearnedPositionalEmbedding"),  # forward: positions + offset, own keywords
        ("bart", "BartLearnedPositionalEmbedding"),
        ("falcon", "FalconLinear"),  # forward: input @ weight.T
    ],
)
def test_quantized_layers_keep_the_models_own_layer_classes(name, own):
    model, run = build(name)
    model.eval()
    with torch.no_grad():
        expected = run(model)
    for plan in (LayerPlan(w_bits=8), LayerPlan(w_bits=8, a_bits=8)):  # a8: tied embeddings too
        fake = copy.deepcopy(model)
        report = quantize_(fake, Recipe(layers={"re:.*": plan}))
        assert isinstance(report, QuantReport) and not report.skipped.keys() - {
            k for k in report.skipped if k.endswith(":input")
        }
        kinds = {type(m).__name__: m for m in fake.modules()}
        assert f"Quant{own}" in kinds and isinstance(kinds[f"Quant{own}"], quant_module.QUANT_TYPES)
        calibrate(fake, [None], lambda m, _: run(m))
        with torch.no_grad():
            quantized = run(fake)
        assert sqnr(quantized, expected) > 30, "8-bit weights keep the output (Gemma was 2.7 dB)"
        deployed, deploy_report = to_deploy(fake, "cpu", run)
        assert any(type(m).__name__ == f"Deploy{own}" for m in deployed.modules())
        with torch.no_grad():
            shipped = run(deployed)
        if plan.a_bits is None:
            assert torch.equal(shipped, quantized), "the deploy form is the fake-quant model"
        else:
            assert sqnr(shipped, quantized) > 35


def test_a_changed_weight_seen_by_an_own_forward_is_the_quantized_one():
    """Without the Quant class, an own forward reading ``self.weight`` would compute in float."""
    model, run = build("falcon")
    model.eval()
    fake = copy.deepcopy(model)
    quantize_(fake, Recipe(layers={"re:.*dense_h_to_4h": LayerPlan(w_bits=2)}))
    with torch.no_grad():
        assert relative_error(run(fake), run(model)) > 1e-2
        with quant_module.float_forward():
            assert torch.equal(run(fake), run(model))


@pytest.mark.parametrize("name", ["wav2vec2", "whisper", "gpt2", "llava"])
def test_every_weight_is_quantized_or_listed_with_why(name):
    """After quantize_, every parameter of two or more dimensions is in a Quant layer or listed;
    wav2vec2's weight-normed positional convolution has no quantized form: it stays float, said
    so. Whisper's Conv1d feature encoder is quantized."""
    model, run = build(name)
    model.eval()
    report = quantize_(
        model, Recipe(layers={"re:.*(fc|mlp|proj|embed|conv|wte|head).*": LayerPlan(w_bits=8)})
    )
    report.skipped.update(quant_module.unquantize_uncalled_(model, run))
    left, share = quant_module.left_in_float(model, report.skipped)
    quantized = quant_module.quantized_weights(model)
    seen, total, floats = set(), 0, 0
    for key, param in model.named_parameters():
        if param.dim() < 2:
            continue
        total += param.numel()
        assert key in quantized or key in left, f"{key}: neither quantized nor listed"
        floats += param.numel() if key in left else 0
        seen.add(key)
    assert left.keys() <= seen and share == pytest.approx(floats / total)
    assert all(reason and "\n" not in reason for reason in left.values())
    if name == "wav2vec2":
        weight = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"
        assert "no quantized form" in left[weight]
    if name == "whisper":
        assert "model.encoder.conv1.weight" in quantized and not left
    with torch.no_grad():
        fake = run(model)
        deployed, _ = to_deploy(model, "cpu", run)
        assert torch.equal(run(deployed), fake)


class ReadsTheTable(nn.Module):
    """Uses its position table as ``.weight`` and never calls it (as some encoders do)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(x + self.positions.weight[: x.shape[1]])


def test_a_layer_the_model_never_calls_is_kept_float_and_said_so():
    torch.manual_seed(0)
    model, x = ReadsTheTable(), torch.randn(2, 6, 8)
    quantize_(model, Recipe(layers={"re:.*": LayerPlan(w_bits=4)}))
    reverted = quant_module.unquantize_uncalled_(model, lambda m: m(x))
    assert reverted == {"positions": quant_module.NOT_CALLED}
    assert type(model.positions) is nn.Embedding and type(model.head).__name__ == "QuantLinear"
    left, _ = quant_module.left_in_float(model, reverted)
    assert left == {"positions.weight": quant_module.NOT_CALLED}
    with torch.no_grad():
        fake = model(x)
        deployed, _ = to_deploy(model, "cpu")
        assert torch.equal(deployed(x), fake), "fake-quant and deploy forms agree"


def test_weights_no_prune_group_reaches_are_listed():
    model, run = build("mixtral")  # experts: 3-D tensors the trace does not follow (yet)
    model.eval()
    _, report = prune_(model, {}, run)
    assert set(report.untouched) == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert all("no prune group reaches it" in reason for reason in report.untouched.values())


def test_heads_of_one_fused_projection_are_pruned_whole():
    """GPT-NeoX: one projection viewed as (heads, 3 × head_dim), then chunked into q, k, v."""
    model, run = build("gpt-neox")
    model.eval()
    analysis = analyze(model, run)
    heads = analysis.groups["gpt_neox.layers.0.attention"]
    assert heads.kind == "heads" and heads.prunable and heads.size == 4
    reference = copy.deepcopy(model)
    record, report = prune_(model, {heads.name: LayerPlan(keep_ratio=0.5)}, run)
    attention = model.gpt_neox.layers[0].attention
    assert (
        attention.query_key_value.out_features == 2 * 3 * 16 and attention.dense.in_features == 32
    )
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        assert relative_error(run(model), run(reference)) < 1e-4


def test_heads_with_a_bias_computed_from_the_head_count_are_blocked_with_why():
    """BLOOM's ALiBi slopes are made from the number of heads at run time: a kept head would get
    another head's slope, so its heads are not offered (its MLPs are)."""
    model, run = build("bloom")
    analysis = analyze(model.eval(), run)
    heads = analysis.groups["transformer.h.0.self_attention"]
    assert not heads.prunable and "ALiBi" in heads.reason
    assert analysis.groups["transformer.h.0.mlp.dense_h_to_4h"].prunable
    _, report = prune_(model, {}, run)  # what is not offered is in every prune report, with why
    assert "ALiBi" in report.blocked["transformer.h.0.self_attention"]


def test_query_heads_around_one_key_value_head_are_pruned_and_the_shared_head_kept():
    """Gemma with one key/value head (multi-query attention): query heads go with their output
    columns; the shared key and value stay; fewer queries read them."""
    model, run = build("gemma")
    model.eval()
    analysis = analyze(model, run)
    heads = analysis.groups["model.layers.0.self_attn"]
    assert heads.prunable and heads.queries_only and heads.size == 4
    reference = copy.deepcopy(model)
    record, report = prune_(model, {heads.name: LayerPlan(keep_ratio=0.5)}, run)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 32 and attention.o_proj.in_features == 32
    assert attention.k_proj.out_features == 16 and attention.num_key_value_groups == 2
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        assert relative_error(run(model), run(reference)) < 1e-4
        assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 5)
