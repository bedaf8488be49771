"""Calibration one block at a time from the weight file (compsearch.sequential): the artifact is
byte for byte the one ``pipeline.compress`` writes in memory, no more than one block is ever in
float, the weight files give exactly what transformers loads, and what it cannot take is refused
before any work."""

from __future__ import annotations

import pytest
import torch

from compsearch.errors import RecipeError, TaskError
from compsearch.fingerprint import model_fingerprint
from compsearch.pipeline import compress
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe
from compsearch.sequential import _fingerprint, compress_sequentially
from compsearch.tasks.weights import GGUFWeights, SafetensorsWeights, meta_tensors

pytest.importorskip("gguf")
from tiny_llama import tiny_llama_task

BLOCKS = r"re:model\.layers\..*"
TIED = {"model.embed_tokens": LayerPlan(w_bits=8), "lm_head": LayerPlan(w_bits=8)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_task(tmp_path_factory.mktemp("tiny-llama"), blocks=3)


def _recipe(plan: LayerPlan, observer="minmax", **layers) -> Recipe:
    return Recipe(layers={BLOCKS: plan, **TIED, **layers}, finetune=FinetuneBudget(steps=0),
                  calibration=CalibrationPlan(batches=3, observer=observer))  # fmt: skip


@pytest.mark.parametrize("plan, observer", [
    (LayerPlan(w_bits=4, group_size=32), "minmax"),
    (LayerPlan(w_bits=4, group_size=32, method="gptq"), "mse"),
    (LayerPlan(w_bits=4, group_size=32, w_format="affine", method="gptq"), "minmax"),
])  # fmt: skip
def test_the_artifact_is_the_one_calibration_in_memory_writes(tiny, tmp_path, plan, observer):
    recipe = _recipe(plan, observer, **{"model.layers.1.mlp.down_proj": LayerPlan(w_bits=8)})
    in_memory = compress(tiny, recipe)
    in_memory.save(tmp_path / "memory.safetensors")
    result = compress_sequentially(tiny, recipe, tmp_path / "blocks.safetensors")
    assert result.path.read_bytes() == (tmp_path / "memory.safetensors").read_bytes()
    assert result.blocks == 3
    report, expected = result.quant_report, in_memory.quant_report
    assert report.quantized.keys() == expected.quantized.keys()
    assert report.rounding == expected.rounding
    assert report.left_float == expected.left_float
    assert report.float_share == pytest.approx(expected.float_share)
    if plan.method == "gptq":
        assert len(report.rounding) == 3 * 7


def test_no_more_than_one_block_is_ever_in_float(tiny, tmp_path, monkeypatch):
    seen = []
    original = GGUFWeights.read

    def read(self, names):
        model = self_model[0]
        alive = [i for i, block in enumerate(model.model.layers)
                 if any(not p.is_meta for p in block.parameters())]  # fmt: skip
        seen.append((sorted({n.split(".")[2] for n in names if n.startswith("model.layers.")}),
                     alive))  # fmt: skip
        return original(self, names)

    self_model = []
    weight_file = type(tiny).weight_file

    def keep(task):
        model, weights = weight_file(task)
        self_model.append(model)
        return model, weights

    monkeypatch.setattr(GGUFWeights, "read", read)
    monkeypatch.setattr(type(tiny), "weight_file", keep)
    compress_sequentially(tiny, _recipe(LayerPlan(w_bits=4, group_size=32, method="gptq")),
                          tmp_path / "a.safetensors")  # fmt: skip
    assert seen[0] == ([], [])  # embedding and norm first, no block
    assert [s[0] for s in seen[1:]] == [["0"], ["1"], ["2"]]  # then one block per read
    assert all(alive == [] for _, alive in seen)  # the block before was let go
    assert not [n for n in meta_tensors(self_model[0]) if not n.startswith("model.layers.")]


def test_weight_files_give_what_transformers_loads(tiny, tmp_path):
    teacher = tiny.teacher()
    state = teacher.state_dict()
    model, weights = tiny.weight_file()
    assert weights.names() == set(state) - {"lm_head.weight"}  # tied to the embedding in the file
    assert _fingerprint(model, weights) == model_fingerprint(teacher)
    weights.load_into(model, lambda name: True)
    assert meta_tensors(model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    from safetensors.torch import save_model

    (tmp_path / "hf").mkdir()
    save_model(teacher, str(tmp_path / "hf" / "model.safetensors"))  # as save_pretrained writes
    folder = SafetensorsWeights(tmp_path / "hf")
    read = folder.read(folder.names())
    assert all(torch.equal(read[name], state[name]) for name in folder.names())


def test_what_one_block_at_a_time_cannot_take_is_refused_before_any_work(tiny, tmp_path):
    plan = LayerPlan(w_bits=4, group_size=32)
    cases = {
        "quantizes inputs": _recipe(LayerPlan(w_bits=8, a_bits=8)),
        "method awq": _recipe(LayerPlan(w_bits=4, group_size=32, method="awq")),
        "does not prune": _recipe(
            plan, **{"model.layers.0.mlp.up_proj": LayerPlan(keep_ratio=0.5)}
        ),
        "does not fine-tune": Recipe(layers={BLOCKS: plan}, finetune=FinetuneBudget(steps=5)),
        "numbered blocks of one ModuleList": Recipe(layers=TIED, finetune=FinetuneBudget(steps=0)),
    }
    for words, recipe in cases.items():
        with pytest.raises(RecipeError, match=words):
            compress_sequentially(tiny, recipe, tmp_path / "x.safetensors")
    from compsearch.tasks.digits import make_task

    with pytest.raises(TaskError, match="builds its teacher in memory"):
        compress_sequentially(make_task(), _recipe(plan), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
