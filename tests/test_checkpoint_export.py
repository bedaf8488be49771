"""compressed-tensors and GGUF exports: written from compsearch's codes, loaded back by their own
libraries with every tensor equal; refusals write nothing. A tiny Llama teacher is written as a
GGUF file (SmolLM2's tokenizer and metadata, small sizes) and loaded the way ``smollm`` is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_llama import tiny_llama_task

from compsearch.errors import ExportError
from compsearch.exports.artifact import export_model
from compsearch.pipeline import compress
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe

pytest.importorskip("compressed_tensors")
gguf = pytest.importorskip("gguf")

LAYERS = r"re:model\.layers\..*"
TIED = {"model.embed_tokens": LayerPlan(w_bits=8), "lm_head": LayerPlan(w_bits=8)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_llama_task(tmp_path_factory.mktemp("tiny-llama"))


def _artifact(task, tmp_path, layers):
    recipe = Recipe(layers=layers, finetune=FinetuneBudget(steps=0),
                    calibration=CalibrationPlan(batches=1))  # fmt: skip
    folder = tmp_path / "final"
    compress(task, recipe).save(folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("w_format, bits, group", [("intz", 4, 32), ("int", 8, None)])
def test_compressed_tensors_loads_back_exactly_and_packs_as_the_library_does(
    tiny_llama, tmp_path, w_format, bits, group
):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file

    plan = LayerPlan(w_bits=bits, w_format=None if w_format == "int" else w_format,
                     granularity="per_group" if group else None, group_size=group)  # fmt: skip
    folder = _artifact(tiny_llama, tmp_path, {LAYERS: plan, **TIED})
    result = export_model(folder, "compressed-tensors", task=tiny_llama)
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    (scheme,) = config["config_groups"].values()
    assert scheme["weights"]["num_bits"] == bits and scheme["format"] == "pack-quantized"
    assert scheme["weights"]["strategy"] == ("group" if group else "channel")
    tensors = load_file(result.path / "model.safetensors")
    from compsearch.kernels.packing import read_packed

    packed, _ = read_packed(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    codes = packed.weights[name].signed_codes().to(torch.int8)
    assert torch.equal(tensors[f"{name}.weight_packed"], pack_to_int32(codes, bits))
    assert (result.path / "tokenizer.json").is_file()
    report = json.loads((folder / "compressed-tensors.json").read_text())
    assert report["size_bytes"] == result.size_bytes


def test_mid_rise_recipes_travel_one_bit_wider_and_w8a8_as_int_quantized(tiny_llama, tmp_path):
    layers = {"model.layers.1.self_attn.q_proj": LayerPlan(w_bits=4, w_format="intz"),
              r"re:.*mlp.*": LayerPlan(w_bits=3),
              r"re:.*self_attn.*": LayerPlan(w_bits=8, a_bits=8), **TIED}  # fmt: skip
    folder = _artifact(tiny_llama, tmp_path, layers)
    result = export_model(folder, "compressed-tensors", task=tiny_llama)
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    schemes = {g["format"]: g for g in config["config_groups"].values()}
    assert schemes["pack-quantized"]["weights"]["num_bits"] == 4  # 2q+1 at s/2
    assert schemes["int-quantized"]["input_activations"]["strategy"] == "tensor"
    assert any("[-127, 127]" in note for note in result.notes)
    fused = [note for note in result.notes if "vLLM fuses" in note]
    assert fused == ["model.layers.1.self_attn: q_proj/k_proj/v_proj carry different schemes; "
                     "vLLM fuses them into one layer and needs one scheme"]  # fmt: skip


# Q8_0 is the 8-bit embedding in each; Q5_1 shares Q5_0's high bits and Q4_1's minimum
@pytest.mark.parametrize("w_format, bits, qtype", [("intz", 4, "Q4_0"), ("int", 4, "Q5_0"),
                                                   ("affine", 4, "Q4_1")])  # fmt: skip
def test_gguf_reads_back_exactly_in_gguf_and_transformers(tiny_llama, tmp_path, w_format, bits,
                                                          qtype):  # fmt: skip
    plan = LayerPlan(w_bits=bits, w_format=None if w_format == "int" else w_format,
                     granularity="per_group", group_size=32)  # fmt: skip
    folder = _artifact(tiny_llama, tmp_path, {LAYERS: plan, **TIED})
    result = export_model(folder, "gguf", task=tiny_llama)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(result.path).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_the_read_back_checks_can_fail(tiny_llama, tmp_path, monkeypatch):
    import compsearch.exports.compressed_tensors as ct
    import compsearch.exports.gguf_file as gguf_file

    plan = LayerPlan(w_bits=4, w_format="intz", granularity="per_group", group_size=32)
    folder = _artifact(tiny_llama, tmp_path, {LAYERS: plan, **TIED})
    before = sorted(p.name for p in folder.iterdir())
    # q/k rows left in Hugging Face order: gguf reads back what was written, transformers does not
    monkeypatch.setattr(gguf_file, "_rotary_order", lambda rows, heads: torch.arange(rows))
    with pytest.raises(ExportError, match="transformers loads .*attn.*differently"):
        export_model(folder, "gguf", task=tiny_llama)
    real = ct.pack_int32
    monkeypatch.setattr(ct, "pack_int32", lambda codes, bits: real(codes.flip(1), bits))
    with pytest.raises(ExportError, match="expected the compressed-tensors checkpoint to load"):
        export_model(folder, "compressed-tensors", task=tiny_llama)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_what_a_format_cannot_hold_is_refused_with_the_reason(tiny_llama, tmp_path):
    w8a8 = _artifact(tiny_llama, tmp_path, {LAYERS: LayerPlan(w_bits=8, a_bits=8), **TIED})
    with pytest.raises(ExportError, match="quantizes its inputs to int8, which a GGUF file"):
        export_model(w8a8, "gguf", task=tiny_llama)
    from compsearch.exports.gguf_file import _qtype
    from compsearch.kernels.packing import pack_weight
    from compsearch.kernels.quant import quantize_

    odd = torch.nn.Sequential(torch.nn.Linear(48, 8))
    quantize_(odd, {"0": LayerPlan(w_bits=4, w_format="intz")})
    with pytest.raises(ExportError, match="blocks are 32 weights.*groups of 48"):
        _qtype("0", pack_weight(odd[0]))
    fp8 = _artifact(tiny_llama, tmp_path / "fp8", {LAYERS: LayerPlan(w_bits=8, w_format="fp8")})
    with pytest.raises(ExportError, match="GGUF has no type for fp8 weights"):
        export_model(fp8, "gguf", task=tiny_llama)
    written = export_model(
        fp8, "compressed-tensors", out=tmp_path / "fp8-checkpoint", task=tiny_llama
    )  # fp8 is expressible: written, loaded back exactly
    config = json.loads((written.path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    affine = _artifact(tiny_llama, tmp_path / "affine",
                       {LAYERS: LayerPlan(w_bits=8, w_format="affine"), **TIED})  # fmt: skip
    with pytest.raises(ExportError, match="affine weights keep a float16 minimum"):
        export_model(affine, "compressed-tensors", task=tiny_llama)
    with pytest.raises(ExportError, match="no 8-bit type with a minimum"):
        export_model(affine, "gguf", task=tiny_llama)
    with pytest.raises(ExportError, match="ending in .gguf"):
        export_model(w8a8, "gguf", out=tmp_path / "x.bin", task=tiny_llama)
    assert not list(tmp_path.rglob("*.gguf")) and not list(tmp_path.rglob("compressed-tensors"))


def test_a_uniformly_pruned_llama_exports_a_config_transformers_loads(tiny_llama, tmp_path):
    layers = {r"re:.*mlp\.(gate|up)_proj": LayerPlan(keep_ratio=0.5),
              LAYERS: LayerPlan(w_bits=8)}  # fmt: skip
    folder = _artifact(tiny_llama, tmp_path, {**layers, **TIED})
    result = export_model(folder, "compressed-tensors", task=tiny_llama)
    config = json.loads((result.path / "config.json").read_text())
    assert config["intermediate_size"] == 64
    gguf_result = export_model(folder, "gguf", task=tiny_llama)
    fields = gguf.GGUFReader(gguf_result.path).fields
    assert fields["llama.feed_forward_length"].contents() == 64
    pruned_only = _artifact(tiny_llama, tmp_path / "float", {r"re:.*mlp\.(gate|up)_proj":
                                                             LayerPlan(keep_ratio=0.5)})  # fmt: skip
    dense = export_model(pruned_only, "compressed-tensors", task=tiny_llama)
    config = json.loads((dense.path / "config.json").read_text())
    assert config["intermediate_size"] == 64 and "quantization_config" not in config


def test_layers_pruned_to_different_sizes_are_refused_with_the_loader_to_use(tiny_llama, tmp_path):
    layers = {r"re:model\.layers\.0\.mlp\.(gate|up)_proj": LayerPlan(keep_ratio=0.5), **TIED}
    folder = _artifact(tiny_llama, tmp_path, layers)
    with pytest.raises(ExportError, match="no single LlamaConfig holds the pruned sizes.*"
                                          "compsearch.load"):  # fmt: skip
        export_model(folder, "compressed-tensors", task=tiny_llama)


@pytest.mark.slow
@pytest.mark.parametrize("bits, w_format", [(8, "int"), (4, "intz"), (4, "affine")])
def test_smollm_recipes_load_in_compressed_tensors_and_gguf_exactly(tmp_path, bits, w_format):
    from compsearch.tasks import get_task
    from compsearch.tasks.language import smollm_path

    task = get_task("smollm")
    plan = LayerPlan(w_bits=bits, w_format=None if w_format == "int" else w_format,
                     granularity="per_group", group_size=32)  # fmt: skip
    folder = _artifact(task, tmp_path, {LAYERS: plan, **TIED})
    single = export_model(folder, "gguf", task=task)
    written = {t.name: t for t in gguf.GGUFReader(single.path).tensors}
    expected = {8: "Q8_0", 4: "Q4_1" if w_format == "affine" else "Q4_0"}[bits]
    assert written["blk.29.ffn_down.weight"].tensor_type.name == expected
    if w_format == "affine":  # SmolLM2's own grid: the package's Q4_1 tensors, byte for byte
        shipped = gguf.GGUFReader(smollm_path()).tensors
        differ = [
            t.name
            for t in shipped
            if not np.array_equal(
                np.asarray(t.data).view(np.uint8), np.asarray(written[t.name].data).view(np.uint8)
            )
        ]
        assert differ == ["token_embd.weight"]  # int8 per row here, Q8_0 per 32 values there
        return
    checkpoint = export_model(folder, "compressed-tensors", task=task)
    assert checkpoint.size_bytes > single.size_bytes  # the dense float32 embedding
