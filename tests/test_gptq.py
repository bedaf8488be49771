import pytest
import torch
from torch import nn

from compsearch.errors import RecipeError
from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.gptq import block_of, gptq_
from compsearch.kernels.packing import export_packed
from compsearch.kernels.quant import quantize_
from compsearch.recipes import FinetuneBudget, LayerPlan, Recipe


def _correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs like a transformer's: correlated features with a decaying spectrum, a few outliers."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(0))
    mixing *= torch.logspace(0, -2, features).unsqueeze(1)
    x = torch.randn(n, features, generator=generator) @ mixing
    x[:, :4] *= 8.0
    return x


def _layer_error(
    plan: LayerPlan, x: torch.Tensor, held_out: torch.Tensor, act_order: bool = True
) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    reference, reference_held = model(x).detach(), model(held_out).detach()
    quantize_(model, {"0": plan})
    if plan.method == "gptq":
        batches = [x[:1024], x[1024:]]
        report = gptq_(model, ["0"], batches, lambda m, b: m(b), act_order=act_order)
        assert report.gptq_error["0"] < report.rtn_error["0"]
    errors = []
    for inputs, expected in ((x, reference), (held_out, reference_held)):
        out = model(inputs).detach()
        errors.append(float((out - expected).norm() / expected.norm()))
    return errors[0], errors[1]


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("granularity", [{}, {"group_size": 32}, {"w_format": "affine"},
                                         {"group_size": 32, "w_format": "affine"}])  # fmt: skip
def test_gptq_leaves_less_output_error_than_round_to_nearest(granularity, act_order):
    x, held_out = _correlated_inputs(2048, 128, 1), _correlated_inputs(1024, 128, 2)
    rtn = _layer_error(LayerPlan(w_bits=4, **granularity), x, held_out)
    gptq = _layer_error(LayerPlan(w_bits=4, method="gptq", **granularity), x, held_out, act_order)
    assert gptq[0] <= 0.7 * rtn[0], (gptq, rtn)  # on the calibration inputs
    assert gptq[1] <= 0.8 * rtn[1], (gptq, rtn)  # and on inputs it never saw


@pytest.mark.parametrize("w_format", [None, "affine"])
def test_gptq_weights_are_on_the_grid_and_ship_exactly(w_format):
    x = _correlated_inputs(512, 128, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
    plan = LayerPlan(w_bits=3, group_size=32, method="gptq", w_format=w_format)
    quantize_(model, {"0": plan, "2": plan})
    gptq_(model, ["0", "2"], [x], lambda m, b: m(b))
    for layer in (model[0], model[2]):
        assert torch.equal(layer.quantized_weight(), layer.weight)  # re-quantizing changes nothing
    packed = export_packed(model)
    assert torch.equal(packed.weights["0"].dequantize(), model[0].weight.detach())
    deployed, _ = to_deploy(model)
    assert torch.allclose(deployed(x), model(x), atol=1e-5)


def test_gptq_keeps_round_to_nearest_where_it_cannot_apply_and_says_so():
    model = nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 8))
    quantize_(model, {"0": LayerPlan(w_bits=4), "1": LayerPlan(w_bits=4)})
    ids = torch.randint(0, 40, (4, 16))
    report = gptq_(model, ["0", "1"], [ids], lambda m, b: m(b))
    assert "round-to-nearest" in report.skipped["0"] and "1" in report.gptq_error


def test_layers_group_into_their_numbered_block():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("model.layers.3.mlp.down_proj") == "model.layers.3"
    assert block_of("encoder.layer.10.attention.self.query") == "encoder.layer.10"
    assert block_of("lm_head") == "lm_head"


def test_a_recipe_names_only_known_rounding_methods():
    with pytest.raises(RecipeError, match=r"method: expected one of 'rtn', 'gptq', 'awq'"):
        LayerPlan.from_dict({"w_bits": 4, "method": "hqq"}, "layers.x")


def test_compress_with_gptq_tracks_the_teacher_closer_than_rtn(tmp_path):
    from test_vlm_llm import _tiny_causal_lm

    from compsearch.pipeline import compress
    from compsearch.tasks import get_task

    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    batch = task.calibration_batches(12)[-1]  # a batch the 8 calibration batches do not hold
    with torch.no_grad():
        expected = task.forward(task.teacher(), batch).logits
    errors = {}
    for method in ("rtn", "gptq"):
        plan = LayerPlan(w_bits=3, group_size=32, method=method)
        recipe = Recipe(layers={"re:.*(proj)$": plan}, finetune=FinetuneBudget(steps=0))
        result = compress(task, recipe)
        with torch.no_grad():
            logits = task.forward(result.deployed, batch).logits
        errors[method] = float((logits - expected).norm() / expected.norm())
        if method == "gptq":
            assert len(result.quant_report.rounding) == 14  # 7 projections in each of 2 blocks
            assert all(
                v.startswith("gptq: output error") for v in result.quant_report.rounding.values()
            )
    assert errors["gptq"] < errors["rtn"], errors


def test_block_by_block_rounds_exactly_as_running_the_whole_model(tmp_path, monkeypatch):
    import copy

    from test_vlm_llm import _tiny_causal_lm

    from compsearch.kernels import gptq
    from compsearch.tasks import get_task

    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    batches = task.calibration_batches(3)
    model = task.teacher()
    quantize_(model, {"re:.*(proj)$": LayerPlan(w_bits=4, group_size=32)})
    layers = [n for n, _ in model.named_modules() if n.endswith("proj")]
    whole = copy.deepcopy(model)
    blockwise = gptq_(model, layers, batches, task.forward)
    assert blockwise.blockwise
    monkeypatch.setattr(gptq, "_block_chain", lambda *args: None)
    assert not gptq_(whole, layers, batches, task.forward).blockwise
    for (name, a), (_, b) in zip(model.named_parameters(), whole.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_the_space_searches_rounding_method_and_group_size_on_linear_layers_only(tmp_path):
    from test_vlm_llm import _tiny_causal_lm

    from compsearch.spaces import discover
    from compsearch.spaces.config import parse_space
    from compsearch.spaces.space import Space, parse_label
    from compsearch.tasks import get_task

    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    config = parse_space({"w_bits": [4, 16], "a_bits": [16], "granularity": ["per_group"],
                          "group_size": [32, 64], "method": ["rtn", "gptq"],
                          "grouping": "per_layer"})  # fmt: skip
    space = Space.build(config, discover(task), task.name)
    labels = {u.name: [c.label for c in u.choices] for u in space.quant_units}
    projection = next(v for k, v in labels.items() if k.endswith("mlp.down_proj"))
    assert set(projection) == {"w4g32", "w4g64", "w4g32-gptq", "w4g64-gptq", "float"}
    embedding = next(v for k, v in labels.items() if "embed" in k)
    assert not any(label.endswith("-gptq") for label in embedding)
    choice = parse_label("w4g32-gptq")
    assert choice.method == "gptq" and choice.group_size == 32 and choice.label == "w4g32-gptq"
    assert choice.plan() == LayerPlan(w_bits=4, granularity="per_group", group_size=32,
                                      method="gptq")  # fmt: skip


def test_compress_with_awq_scales_the_layers_a_norm_feeds_and_reports_the_rest(tmp_path):
    from test_vlm_llm import _tiny_causal_lm

    from compsearch.pipeline import compress
    from compsearch.tasks import get_task

    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    plan = LayerPlan(w_bits=3, group_size=32, method="awq")
    recipe = Recipe(layers={"re:.*(proj)$": plan}, finetune=FinetuneBudget(steps=0))
    report = compress(task, recipe).quant_report
    assert sorted(k.rsplit(".", 1)[-1] for k in report.rounding) == sorted(
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * 2
    )
    assert all(v.startswith("awq α=") for v in report.rounding.values())
    skipped = [k for k in report.skipped if k.endswith(":method")]
    assert sorted(k.split(".")[-1] for k in skipped) == sorted(["o_proj:method",
                                                                "down_proj:method"] * 2)  # fmt: skip


def test_a_tied_embedding_and_head_keep_every_sharers_limits_and_round_to_nearest(tmp_path):
    import transformers as tf
    from test_vlm_llm import _tiny_causal_lm

    from compsearch.spaces import discover
    from compsearch.spaces.config import parse_space
    from compsearch.spaces.space import Space
    from compsearch.tasks import get_task

    _tiny_causal_lm(tmp_path)
    config = tf.AutoConfig.from_pretrained(tmp_path)
    config.tie_word_embeddings = True
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    info = discover(task)
    assert {"model.embed_tokens", "lm_head"} in [set(t) for t in info.ties]
    space = Space.build(parse_space({"w_bits": [4, 8], "a_bits": [16], "granularity": ["per_group"],
                                     "group_size": [32], "method": ["rtn", "gptq"],
                                     "grouping": "global"}), info, task.name)  # fmt: skip
    tied = next(u for u in space.quant_units if "model.embed_tokens" in u.layers)
    assert "lm_head" in tied.layers
    assert [c.label for c in tied.choices] == ["w8g32"]  # the first layer's 8 bits hold for both
