"""Every CUDA path, checked on a CUDA device: the int8 and fp8 kernels, CUDA-graph capture, latency
with device events, bf16 fine-tuning, checkpoints and the deploy form of a language model.

All marked ``cuda``: skipped without a CUDA device (conftest), run by ``make gpu-check``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_quant import FFN  # a BERT-shaped feed-forward block
from torch import nn

from compsearch.kernels.capture import capture
from compsearch.kernels.deploy import deploy_table, to_deploy
from compsearch.kernels.devices import fp8_available, int_mm_available
from compsearch.kernels.observers import calibrate
from compsearch.kernels.quant import quantize_
from compsearch.recipes import CalibrationPlan, DistillPlan, FinetuneBudget, LayerPlan, Recipe

pytestmark = pytest.mark.cuda


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


def _qat_ffn(plan: LayerPlan, mode: str = "dynamic", tokens: int = 128):
    torch.manual_seed(0)
    model = FFN().cuda()
    x = torch.randn(2, tokens // 2, 768, device="cuda")
    quantize_(model, {"up": plan, "down": plan}, activation_mode=mode)
    calibrate(model, [x], lambda m, b: m(b))
    return model, x


def test_cuda_offers_the_int8_and_fp8_kernels():
    assert int_mm_available("cuda")
    rows = [r for r in deploy_table("cuda") if r.layer == "linear" and r.a_bits == 8]
    assert any(r.kernel == "int_mm" and r.fast for r in rows)
    if torch.cuda.get_device_capability() >= (8, 9):
        assert fp8_available("cuda")
        assert any(r.kernel == "fp8_scaled_mm" and r.fast for r in rows)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_deploy_on_cuda_matches_fake_quant(mode):
    model, x = _qat_ffn(LayerPlan(w_bits=8, a_bits=8), mode)
    reference = model(x).detach()
    deployed, report = to_deploy(model, device="cuda")
    assert set(report.kernels.values()) == {"int_mm"}
    assert _relative_error(deployed(x), reference) <= 0.02


def test_int8_on_cuda_pads_sixteen_rows_or_fewer_for_cublas():
    model, x = _qat_ffn(LayerPlan(w_bits=8, a_bits=8))
    deployed, _ = to_deploy(model, device="cuda")
    for rows in (1, 5, 16, 17):
        small = x.reshape(-1, 768)[:rows]
        assert deployed(small).shape == (rows, 768)
        assert _relative_error(deployed(small), model(small).detach()) <= 0.02


def test_fp8_deploy_on_cuda_matches_fake_quant():
    if not fp8_available("cuda"):
        pytest.skip("fp8 needs compute capability 8.9 or above")
    model, x = _qat_ffn(LayerPlan(w_bits=8, a_bits=8, w_format="fp8"))
    reference = model(x).detach()
    deployed, report = to_deploy(model, device="cuda")
    assert set(report.kernels.values()) == {"fp8_scaled_mm"}
    out = deployed(x)
    assert out.dtype == x.dtype
    assert _relative_error(out, reference) <= 0.05


def test_low_bit_weights_dequantize_on_cuda_exactly():
    model, x = _qat_ffn(LayerPlan(w_bits=4, group_size=128))
    reference = model(x).detach()
    deployed, report = to_deploy(model, device="cuda")
    assert set(report.kernels.values()) == {"dequant"}
    assert _relative_error(deployed(x), reference) <= 1e-4


def test_a_captured_graph_replays_new_inputs_like_eager():
    torch.manual_seed(0)
    model = FFN().cuda().eval()
    x, y = torch.randn(64, 768, device="cuda"), torch.randn(64, 768, device="cuda")
    replay = capture(model, x)
    with torch.inference_mode():
        expected = model(y)
        out = replay(y).clone()
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_captured_int8_deploy_form_replays_like_eager(mode):
    model, x = _qat_ffn(LayerPlan(w_bits=8, a_bits=8), mode)
    deployed, _ = to_deploy(model, device="cuda")
    replay = capture(deployed, x)
    y = torch.randn_like(x)
    with torch.inference_mode():
        expected = deployed(y)
        out = replay(y).clone()
    assert torch.equal(out, expected)


def test_latency_on_cuda_is_timed_with_events_on_the_captured_graph(digits_task):
    from compsearch.objectives.latency import measure_latency

    teacher = digits_task.teacher().cuda()
    result = measure_latency(teacher, digits_task, "cuda", warmup=3, repeats=10)
    assert result.runs == 10
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms < 1000


def _recipe(steps: int) -> Recipe:
    return Recipe(
        layers={"re:.*": LayerPlan(w_bits=8, a_bits=8), "features.3": LayerPlan(keep_ratio=0.5)},
        distill=DistillPlan(alpha=0.7, temperature=2.0),
        finetune=FinetuneBudget(steps=steps, lr=3e-3),
        calibration=CalibrationPlan(batches=2),
    )


def test_compress_fine_tunes_and_deploys_on_cuda(digits_task):
    from compsearch.pipeline import compress

    result = compress(digits_task, _recipe(30), device="cuda")
    assert all(p.is_cuda for p in result.deployed.parameters())
    assert len(result.train.losses) == 30
    assert result.train.losses[-1] < result.train.losses[0]
    teacher = digits_task.evaluate(digits_task.teacher())["accuracy"]
    accuracy = digits_task.evaluate(result.deployed)["accuracy"]
    assert accuracy >= teacher - 0.10, (accuracy, teacher)


def test_a_resumed_cuda_run_ends_near_the_straight_one(digits_task, tmp_path):
    from compsearch.pipeline import compress
    from compsearch.train import Checkpointing

    class Killed(Exception):
        pass

    def kill_at_9(step, loss):
        if step == 9:
            raise Killed

    recipe = _recipe(12)
    straight = compress(digits_task, recipe, device="cuda")
    checkpoint = Checkpointing(tmp_path / "ckpt", every=4)
    with pytest.raises(Killed):
        compress(digits_task, recipe, device="cuda", progress=kill_at_9, checkpoint=checkpoint)
    resumed = compress(
        digits_task, recipe, device="cuda", checkpoint=dataclasses.replace(checkpoint, resume=True)
    )
    assert resumed.train.steps == 12
    for key, value in straight.student.state_dict().items():
        other = resumed.student.state_dict()[key]
        if value.is_floating_point():  # cuDNN's convolution backward is not bit-reproducible
            assert torch.allclose(value, other, atol=1e-2, rtol=1e-2), key
        else:
            assert torch.equal(value, other), key


def test_a_causal_lm_deploys_int8_on_cuda_and_generates_the_same_next_tokens():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = tf.LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    quantize_(model, {"re:.*(proj)$": LayerPlan(w_bits=8, a_bits=8)}, activation_mode="dynamic")
    calibrate(model, [ids], lambda m, b: m(input_ids=b))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    deployed, report = to_deploy(model, device="cuda")
    assert set(report.kernels.values()) == {"int_mm"} and len(report.kernels) == 14
    replay = capture(lambda batch: deployed(input_ids=batch, use_cache=False).logits, ids)
    with torch.inference_mode():
        logits = replay(ids).clone()
    assert _relative_error(logits, reference) <= 0.05
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_int8_on_cuda_runs_widths_that_are_not_multiples_of_8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 36), nn.ReLU(), nn.Linear(36, 10)).cuda()
    x = torch.randn(40, 20, device="cuda")
    plan = LayerPlan(w_bits=8, a_bits=8)
    quantize_(model, {"0": plan, "2": plan}, activation_mode="dynamic")
    calibrate(model, [x], lambda m, b: m(b))
    deployed, report = to_deploy(model, device="cuda")
    assert set(report.kernels.values()) == {"int_mm"}
    assert _relative_error(deployed(x), model(x).detach()) <= 0.02


def test_gptq_awq_and_smoothquant_calibrate_a_causal_lm_on_cuda():
    import transformers as tf

    from compsearch.kernels.awq import awq_
    from compsearch.kernels.gptq import gptq_
    from compsearch.kernels.quant import spec_from_plan
    from compsearch.kernels.smooth import smooth_

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = tf.LlamaForCausalLM(config).cuda().eval()
    batches = [torch.randint(0, 256, (2, 32), device="cuda") for _ in range(3)]

    def run(m, b):
        return m(input_ids=b, use_cache=False).logits

    with torch.no_grad():
        reference = run(model, batches[0])
    smoothed = smooth_(model, {"model.layers.0.self_attn.q_proj": 0.5}, batches, run)
    spec = spec_from_plan(LayerPlan(w_bits=4, group_size=32))
    awq_(model, {"model.layers.1.mlp.up_proj": spec}, batches, run)
    with torch.no_grad():
        assert _relative_error(run(model, batches[0]), reference) < 1e-3  # exact in float
    layers = [n for n, _ in model.named_modules() if n.endswith("proj")]
    quantize_(model, {"re:.*proj$": LayerPlan(w_bits=4, group_size=32)})
    report = gptq_(model, layers, batches, run)
    assert smoothed.groups and report.blockwise and len(report.gptq_error) == 14
    assert all(report.gptq_error[n] < report.rtn_error[n] for n in report.gptq_error)
