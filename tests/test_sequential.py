"""Calibration one block at a time from the weight file (compsearch.sequential): the artifact is
byte for byte the one ``pipeline.compress`` writes in memory, no more than one block is ever in
float, the weight files give exactly what transformers loads, and what it cannot take is refused
before any work."""

from __future__ import annotations

import json

import pytest
import torch

import compsearch.cli.train  # noqa: F401 - bound to final.task_for before a test patches it
import compsearch.final as final
from compsearch.cli import main
from compsearch.errors import RecipeError, TaskError
from compsearch.fingerprint import model_fingerprint
from compsearch.pipeline import compress
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe, write_recipe
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


def test_train_one_block_at_a_time_ships_the_same_artifact_and_report(
    tiny, tmp_path, runs_root, monkeypatch, capsys
):
    monkeypatch.setattr(final, "task_for", lambda recipe, task=None, trust_task=False: tiny)
    path = write_recipe(_recipe(LayerPlan(w_bits=4, group_size=32)), tmp_path / "w4.yaml")
    blocks = final.train_recipe(path, name="blocks", one_block_at_a_time=True)
    memory = final.train_recipe(path, name="memory")
    artifact = "model.safetensors"
    assert (blocks.path / artifact).read_bytes() == (memory.path / artifact).read_bytes()
    reports = [json.loads((run.path / "report.json").read_text()) for run in (blocks, memory)]
    assert reports[0]["kernels"] == reports[1]["kernels"] and reports[0]["steps"] == 0
    assert reports[0]["float_weights"] == reports[1]["float_weights"]
    assert blocks.measurements.compressed["perplexity"] == pytest.approx(
        memory.measurements.compressed["perplexity"]
    )
    tuned = write_recipe(Recipe(layers={BLOCKS: LayerPlan(w_bits=4, group_size=32)},
                                finetune=FinetuneBudget(steps=3)), tmp_path / "tuned.yaml")  # fmt: skip
    assert main(["train", str(tuned), "--one-block-at-a-time", "--name", "tuned"]) == 2
    error = capsys.readouterr().err
    assert "does not fine-tune" in error and "without --one-block-at-a-time" in error
    assert not list((runs_root / "final").glob("*tuned*"))


@pytest.mark.cuda
def test_one_block_at_a_time_on_cuda_writes_what_the_cpu_writes(tiny, tmp_path):
    from compsearch.kernels.packing import read_packed

    recipe = _recipe(LayerPlan(w_bits=4, group_size=32, method="gptq"))
    torch.cuda.reset_peak_memory_stats()
    on_gpu = compress_sequentially(tiny, recipe, tmp_path / "cuda.safetensors", device="cuda")
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    on_cpu = compress_sequentially(tiny, recipe, tmp_path / "cpu.safetensors")
    gpu, _ = read_packed(on_gpu.path)
    cpu, _ = read_packed(on_cpu.path)
    assert gpu.weights.keys() == cpu.weights.keys() and gpu.ties == cpu.ties
    for name, weight in cpu.weights.items():  # GPTQ's float sums differ by rounding on the GPU
        expected = weight.dequantize()
        error = (gpu.weights[name].dequantize() - expected).norm() / expected.norm()
        assert error < 0.05, name
    embedding_mb = 49152 * 64 * 4 / 2**20  # float32; its fake-quantized copy beside it
    assert peak_mb < 3 * embedding_mb + 3 * on_gpu.largest_block_mb
