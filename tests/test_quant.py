import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compsearch.errors import KernelError
from compsearch.kernels.deploy import deploy_table, kernel_for, to_deploy
from compsearch.kernels.devices import onednn_available
from compsearch.kernels.fuse import fold_batchnorm_
from compsearch.kernels.observers import calibrate
from compsearch.kernels.packing import (
    export_packed,
    pack_codes,
    packed_nbytes,
    read_packed,
    save_packed,
    unpack_codes,
)
from compsearch.kernels.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    fake_quantize,
    grid,
    grouped,
    learn_scales_,
    quantize_,
    weight_scale,
)
from compsearch.recipes import LayerPlan, Recipe
from compsearch.tasks.models import DigitsCNN


class FFN(nn.Module):
    """A BERT-shaped feed-forward block."""

    def __init__(self, hidden: int = 768, inner: int = 3072) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.act = nn.GELU()
        self.down = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.double() - approximation.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise.clamp(min=1e-300)))


def w8a8(mode: str = "static") -> dict:
    return {
        "up": LayerPlan(w_bits=8, a_bits=8),
        "down": LayerPlan(w_bits=8, a_bits=8),
    }


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_sqnr_meets_the_bound_per_group_32(bits):
    torch.manual_seed(0)
    weight = torch.randn(1024, 1024)
    spec = QuantSpec(w_bits=bits, granularity="per_group", group_size=32)
    scale = weight_scale(weight, spec, None)
    restored = fake_quantize(grouped(weight, spec), scale, bits).reshape(weight.shape)
    assert sqnr_db(weight, restored) >= 44 - (8 - bits) * 6.02


@pytest.mark.parametrize("bits", range(2, 9))
def test_all_2_to_the_n_levels_are_used(bits):
    torch.manual_seed(0)
    weight = torch.rand(64, 4096) * 2 - 1  # uniform: every level gets hit
    spec = QuantSpec(w_bits=bits)
    scale = weight_scale(weight, spec, None)
    values = fake_quantize(grouped(weight, spec), scale, bits)
    levels = torch.unique(torch.round(values / scale.half().float() * 2) / 2)
    assert len(levels) == 2**bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_is_dense(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_straight_through_gradient_and_lsq_scale_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    model = nn.Sequential(layer)
    quantize_(model, {"0": LayerPlan(w_bits=4)})
    learn_scales_(model)
    quant = model[0]
    out = quant(torch.randn(8, 64)).sum()
    out.backward()
    assert quant.weight.grad is not None and quant.weight.grad.abs().sum() > 0
    assert quant.weight_quant.scale.grad is not None
    assert quant.weight_quant.scale.grad.abs().sum() > 0


def test_quantize_checks_everything_before_touching_the_model():
    model = FFN(64, 96)
    before = copy.deepcopy(model.state_dict())
    bad = [
        ({"up": LayerPlan(w_bits=4), "nope": LayerPlan(w_bits=4)}, "expected a module name"),
        ({"up": LayerPlan(w_bits=4), "act": LayerPlan(w_bits=4)}, "expected a quantizable layer"),
        (
            {"up": LayerPlan(w_bits=4), "down": LayerPlan(w_bits=4, group_size=64)},
            "expected group_size to divide the 96 input features",
        ),
    ]
    for plans, message in bad:
        with pytest.raises(KernelError, match=message):
            quantize_(model, plans)
        assert isinstance(model.up, nn.Linear) and not isinstance(model.up, QuantLinear)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bits_out_of_range_is_refused():
    with pytest.raises(KernelError, match=r"w_bits: expected an integer in \[2, 8\]"):
        grid(9)


def test_regex_rules_apply_to_quantizable_layers_only():
    model = DigitsCNN()
    report = quantize_(model, Recipe(layers={"re:.*": LayerPlan(w_bits=4)}))
    assert set(report.quantized) == {"features.0", "features.3", "features.7", "fc1", "fc2"}


def test_static_calibration_observers_differ_and_recalibration_resets():
    torch.manual_seed(0)
    model = FFN(32, 64)
    quantize_(model, w8a8())
    x = torch.randn(2048, 32)
    x[0, 0] = 50.0  # one outlier
    ranges = {}
    for observer in ("minmax", "percentile", "mse"):
        ranges[observer] = calibrate(model, [x], lambda m, b: m(b), observer=observer)["up"]
    assert ranges["minmax"] == pytest.approx(50.0)
    assert ranges["percentile"] < 10.0
    assert ranges["mse"] < ranges["minmax"]
    again = calibrate(model, [torch.randn(64, 32)], lambda m, b: m(b))["up"]
    assert again < 10.0, "a new calibration must not keep the old maximum"


def test_uncalibrated_static_quantizer_says_what_to_do():
    model = FFN(32, 64)
    quantize_(model, w8a8())
    with pytest.raises(KernelError, match="Run compsearch.kernels.observers.calibrate"):
        model(torch.randn(2, 32))


def test_mse_weight_clipping_lowers_2_bit_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight.normal_()  # bell-shaped, as trained weights are: clipping pays
    reference = model[0].weight.detach().clone()
    quantize_(model, {"0": LayerPlan(w_bits=2)})
    plain = sqnr_db(reference, model[0].quantized_weight().detach())
    calibrate(model, [torch.randn(4, 256)], lambda m, b: m(b), observer="mse")
    clipped = sqnr_db(reference, model[0].quantized_weight().detach())
    assert clipped > plain + 0.5


@pytest.mark.parametrize("plan", [LayerPlan(w_bits=4), LayerPlan(w_bits=4, group_size=32),
                                  LayerPlan(w_bits=4, group_size=32, w_format="affine")])  # fmt: skip
def test_the_clip_search_in_row_chunks_finds_what_one_pass_finds(plan, monkeypatch):
    from compsearch.kernels import observers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300))
    quantize_(model, {"0": plan})
    observers.search_weight_clip_(model[0])
    whole = model[0].weight_quant.clip.clone()
    model[0].weight_quant.clip.fill_(1.0)
    monkeypatch.setattr(observers, "CLIP_CHUNK", 64 * 7)  # 7 rows a pass, the last one short
    observers.search_weight_clip_(model[0])
    assert torch.equal(model[0].weight_quant.clip, whole)
    assert (whole < 1).any()


def _qat_ffn(mode: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = FFN()
    x = torch.randn(2, 64, 768)
    quantize_(model, w8a8(), activation_mode=mode)
    calibrate(model, [x], lambda m, b: m(b))
    return model, x


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_deploy_matches_fake_quant_within_2_percent(mode):
    model, x = _qat_ffn(mode)
    reference = model(x).detach()
    deployed, report = to_deploy(model, run=lambda m: m(x))
    if not onednn_available():  # no native int8 dot products: int8 levels computed in float
        expected = "dequant"
    else:
        expected = "onednn_qlinear" if mode == "static" else "int_mm"
    assert set(report.kernels.values()) == {expected}
    out = deployed(x)
    assert float((out - reference).norm() / reference.norm()) <= 0.02


def test_static_chain_is_fused_on_onednn():
    if not onednn_available():
        pytest.skip("oneDNN int8 linear is absent or inexact here (no VNNI: see kernels.devices)")
    model, x = _qat_ffn("static")
    deployed, report = to_deploy(model, run=lambda m: m(x))
    assert report.chains == [("up", "act", "down")]
    assert deployed.up.post_op == "gelu"
    assert isinstance(deployed.act, nn.Identity)


def test_packed_artifact_reloads_bit_for_bit_and_has_the_expected_size(tmp_path):
    torch.manual_seed(0)
    model = FFN(256, 512)
    plans = {
        "up": LayerPlan(w_bits=3, granularity="per_group", group_size=32),
        "down": LayerPlan(w_bits=5),
    }
    quantize_(model, plans)
    path = save_packed(export_packed(model), tmp_path / "model.safetensors")
    packed, _ = read_packed(path)
    for name in ("up", "down"):
        restored = packed.weights[name].dequantize()
        assert torch.equal(restored, model.get_submodule(name).quantized_weight().detach())
    expected = (
        packed_nbytes(512 * 256, 3)
        + 512 * (256 // 32) * 2  # fp16 scale per group
        + packed_nbytes(256 * 512, 5)
        + 256 * 2  # fp16 scale per channel
        + (512 + 256) * 4  # fp32 biases
    )
    length = int.from_bytes(path.read_bytes()[:8], "little")
    data = path.stat().st_size - 8 - length
    assert data == expected
    bits = (512 * 256 * 3 + 256 * 512 * 5) / 8
    assert abs(data - (bits + 512 * 8 * 2 + 256 * 2 + 768 * 4)) <= 0.01 * data


def test_damaged_artifact_is_a_clear_error(tmp_path):
    model = FFN(64, 96)
    quantize_(model, {"up": LayerPlan(w_bits=4)})
    path = save_packed(export_packed(model), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KernelError, match="cannot be read"):
        read_packed(path)


def test_conv_bn_folding_then_quantized_cnn_deploys():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 1, 8, 8)
    reference = model(x)
    pairs = fold_batchnorm_(model, lambda m: m(x))
    assert pairs == [("features.0", "features.1"), ("features.3", "features.4"),
                     ("features.7", "features.8")]  # fmt: skip
    assert torch.allclose(model(x), reference, atol=1e-5)
    quantize_(model, Recipe(layers={"re:.*": LayerPlan(w_bits=8, a_bits=8)}))
    calibrate(model, [x], lambda m, b: m(b))
    fake = model(x).detach()
    deployed, report = to_deploy(model, run=lambda m: m(x))
    assert report.kernels["features.0"] == "dequant"
    out = deployed(x)
    assert float((out - fake).norm() / fake.norm()) <= 0.02


def test_tied_embedding_stays_tied_and_is_stored_once(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    recipe = Recipe(layers={"re:.*": LayerPlan(w_bits=4), "transformer.wpe": LayerPlan(w_bits=8)})
    report = quantize_(model, recipe)
    assert isinstance(model.transformer.wte, QuantEmbedding)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight_quant is model.transformer.wte.weight_quant
    assert report.tied == {"transformer.wte": "lm_head"} or report.tied == {
        "lm_head": "transformer.wte"
    }
    assert "transformer.h.0.attn.c_attn" in report.quantized  # GPT-2 Conv1D
    fake = model(ids).logits.detach()
    packed = export_packed(model)
    assert len(packed.weights) == len(report.quantized) - 1  # the tied weight once
    deployed, _ = to_deploy(model)
    out = deployed(ids).logits
    assert torch.allclose(out, fake, atol=1e-4, rtol=1e-4)


def test_tied_layers_need_one_plan():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(KernelError, match="share one weight"):
        quantize_(model, {"lm_head": LayerPlan(w_bits=4), "transformer.wte": LayerPlan(w_bits=8)})
    with pytest.raises(KernelError, match="Quantize all of them, or none"):
        quantize_(model, {"lm_head": LayerPlan(w_bits=4)})


def test_fp8_fake_quant_round_trips_through_the_artifact(tmp_path):
    torch.manual_seed(0)
    model = FFN(64, 96)
    quantize_(model, {"up": LayerPlan(w_bits=8, w_format="fp8")})
    packed, _ = read_packed(save_packed(export_packed(model), tmp_path / "m.safetensors"))
    assert torch.equal(packed.weights["up"].dequantize(), model.up.quantized_weight().detach())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_intz_keeps_zero_a_level_and_round_trips_through_the_artifact(tmp_path, bits):
    torch.manual_seed(0)
    model = FFN(64, 96)
    with torch.no_grad():
        model.up.weight[:, :32] = 0.0  # a zero group: the mid-rise grid cannot hold it
    plan = LayerPlan(w_bits=bits, granularity="per_group", group_size=32, w_format="intz")
    quantize_(model, {"up": plan, "down": LayerPlan(w_bits=bits, w_format="intz")})
    packed, _ = read_packed(save_packed(export_packed(model), tmp_path / "m.safetensors"))
    weight = model.up.quantized_weight().detach()
    assert torch.equal(packed.weights["up"].dequantize(), weight)
    assert torch.equal(weight[:, :32], torch.zeros_like(weight[:, :32]))
    levels = weight[:, 32:].reshape(96, 1, 32) / packed.weights["up"].scale.float()[:, 1:, None]
    assert torch.equal(levels, levels.round())  # integer levels, no half steps
    assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1
    codes, sigma = packed.weights["down"].int8_codes()
    assert torch.equal(codes.float() * sigma.float(), packed.weights["down"].dequantize())
    x, scale = torch.randn(8, 32), torch.full((8, 1), 0.01)
    same = torch.equal(
        fake_quantize(x, scale, bits, zero_level=True), fake_quantize(x, scale, bits)
    )
    assert same == (bits == 8)  # int's grid is mid-rise below 8 bits, the integer grid at 8


def test_affine_spans_each_groups_own_range_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, symmetric = FFN(64, 96), FFN(64, 96)
    with torch.no_grad():
        model.up.weight.copy_(
            model.up.weight.abs()
        )  # one-sided groups: half a symmetric grid idles
        symmetric.load_state_dict(model.state_dict())
    plan = {"w_bits": 4, "granularity": "per_group", "group_size": 32}
    quantize_(model, {"up": LayerPlan(**plan, w_format="affine"), "down": LayerPlan(w_bits=3,
              w_format="affine")})  # fmt: skip
    quantize_(symmetric, {"up": LayerPlan(**plan, w_format="intz")})
    weight = model.up.weight.detach()
    affine_error = (model.up.quantized_weight() - weight).norm()
    assert affine_error < 0.6 * (symmetric.up.quantized_weight() - weight).norm()
    packed, _ = read_packed(save_packed(export_packed(model), tmp_path / "m.safetensors"))
    assert packed.weights["up"].scale.shape == (96, 2 * 2)  # scale and minimum per group
    for name in ("up", "down"):
        restored = packed.weights[name].dequantize()
        assert torch.equal(restored, model.get_submodule(name).quantized_weight().detach())
    learn_scales_(model)
    with torch.no_grad():
        model.up.weight_quant.scale[..., 1] += 0.05  # the smallest weights now fall below the grid
    model(torch.randn(4, 64)).pow(2).sum().backward()
    grad = model.up.weight_quant.scale.grad
    assert grad[..., 0].abs().sum() > 0 and grad[..., 1].abs().sum() > 0  # scale and minimum learn


def test_deploy_table_says_which_formats_are_fast_on_cpu():
    table = deploy_table("cpu")
    linear_w8a8 = [r for r in table if r.layer == "linear" and r.w_bits == "8" and r.a_bits == 8]
    # fast where the CPU has int8 dot products (VNNI); without, int8 runs at float speed
    assert any(r.fast for r in linear_w8a8) == onednn_available()
    conv = [r for r in table if r.layer == "conv2d"]
    assert all(not r.fast for r in conv)
    assert kernel_for("linear", QuantSpec(w_bits=4, granularity="per_group", group_size=32,
                                          a_bits=8), "cpu") == "dequant"  # fmt: skip
    assert kernel_for("linear", QuantSpec(w_bits=8, a_bits=8, w_format="fp8"), "cpu") == "dequant"


def test_embedding_quantizes_gathered_rows_exactly_like_the_whole_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64))
    quantize_(model, {"0": LayerPlan(w_bits=3, group_size=32)})
    ids = torch.tensor([[3, 7, 7], [49, 0, 3]])
    whole = model[0].quantized_weight().detach()
    assert torch.equal(model(ids).detach(), whole[ids])


def test_patterns_do_not_quantize_containers_named_by_exact_keys_for_pruning():
    model = FFN(64, 96)
    recipe = Recipe(layers={"re:.*": LayerPlan(w_bits=4), "act": LayerPlan(keep_ratio=0.5)})
    report = quantize_(model, recipe)
    assert set(report.quantized) == {"up", "down"}


class _ReadsItsLayers(nn.Module):
    """Code around layers that reads their attributes, as Hugging Face models do: TF-style padding
    from a conv's ``kernel_size`` (MobileNetV2), a position table's size from ``.weight`` (CLIP)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(16, 32)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        pad = (self.conv.kernel_size[0] - 1) // 2
        image = F.pad(x[:, None, :, :8], (pad, pad, pad, pad))
        positions = torch.arange(min(self.pos.weight.shape[0], x.shape[1]))
        hidden = x + self.pos(positions) + self.conv(image).mean((1, 3))[..., None]
        return self.fc(hidden) @ self.fc.weight.new_ones(32)


def test_deploy_layers_keep_what_code_reads_from_the_layers_they_replace():
    torch.manual_seed(0)
    model = _ReadsItsLayers()
    x = torch.randn(2, 16, 32)
    plans = {"pos": LayerPlan(w_bits=8), "conv": LayerPlan(w_bits=8),
             "fc": LayerPlan(w_bits=8, a_bits=8)}  # fmt: skip
    quantize_(model, plans, activation_mode="dynamic")
    reference = model(x).detach()
    packed = export_packed(model)
    deployed, report = to_deploy(model, run=lambda m: m(x))
    assert report.kernels["pos"] == "int8_gather"
    conv, original = deployed.conv, model.conv
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups"):
        assert getattr(conv, name) == getattr(original, name), name
    assert torch.equal(deployed.pos.weight, packed.weights["pos"].dequantize())
    if report.kernels["fc"] != "dequant":  # served from int8 codes: .weight is made from them
        assert "weight" not in deployed.fc._buffers
    torch.testing.assert_close(deployed.fc.weight, packed.weights["fc"].dequantize())
    out = deployed(x)
    assert float((out - reference).norm() / reference.norm()) <= 0.02
