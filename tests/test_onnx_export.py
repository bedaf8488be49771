"""ONNX export of the deploy form, checked by ONNX Runtime; ONNX Runtime as the latency runtime."""

from __future__ import annotations

import os
import sys

import onnx
import pytest
import torch

from compsearch.errors import ConfigError, ExportError
from compsearch.exports.artifact import TOLERANCE, export_model, output_error
from compsearch.exports.onnx import OnnxRuntimeModel, export_onnx, require_onnx
from compsearch.pipeline import compress
from compsearch.recipes import CalibrationPlan, FinetuneBudget, LayerPlan, Recipe


def _recipe(plan: LayerPlan, mode: str = "static") -> Recipe:
    return Recipe(layers={"re:.*": plan}, finetune=FinetuneBudget(steps=0),
                  calibration=CalibrationPlan(batches=2, activation_mode=mode))  # fmt: skip


@pytest.fixture(scope="module")
def w8a8(digits_task):
    return compress(digits_task, _recipe(LayerPlan(w_bits=8, a_bits=8)))


def _batches(task):
    return [task.example_inputs(), task.calibration_batches(1)[0]]


def test_int8_graph_carries_compsearch_codes_and_matches_the_deploy_form(
    w8a8, digits_task, tmp_path
):
    exported = export_onnx(w8a8.deployed, digits_task, tmp_path / "model.onnx")
    assert exported.size_bytes == os.path.getsize(tmp_path / "model.onnx")
    assert set(exported.forms) == set(w8a8.deploy_report.kernels)
    graph = onnx.load(tmp_path / "model.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == len(exported.forms)  # every layer reads int8 levels
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    first = w8a8.deployed.get_submodule("features.0")
    assert float(scales["model.features.0.activation.scale"]) == pytest.approx(first.input_scale)
    served = OnnxRuntimeModel(exported)
    error = output_error(digits_task, w8a8.deployed, served, _batches(digits_task))
    assert error <= TOLERANCE["integer"]
    torch_acc = digits_task.evaluate(w8a8.deployed, "test")["accuracy"]
    assert digits_task.evaluate(served, "test")["accuracy"] == pytest.approx(torch_acc, abs=0.01)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"]  # no temporaries left


@pytest.mark.parametrize("plan", [
    LayerPlan(w_bits=4, granularity="per_group", group_size=32),  # blocked DequantizeLinear
    LayerPlan(w_bits=6),
])  # fmt: skip
def test_weight_only_graphs_match_the_deploy_form(plan, digits_task, tmp_path):
    result = compress(digits_task, _recipe(plan))
    exported = export_onnx(result.deployed, digits_task, tmp_path / "w.onnx")
    served = OnnxRuntimeModel(exported)
    assert all("int8 inputs" not in form for form in exported.forms.values())
    # float compute wherever ONNX Runtime does not quantize the inputs itself (MatMulNBits)
    exact = all(kernel.startswith("float") for kernel in exported.kernels.values())
    error = output_error(digits_task, result.deployed, served, _batches(digits_task))
    assert error <= (TOLERANCE["float"] if exact else TOLERANCE["integer"])
    assert set(exported.kernels) == set(exported.forms)


def test_teacher_and_calls_of_other_shapes(digits_task, tmp_path):
    from compsearch.kernels.deploy import to_deploy

    teacher, _ = to_deploy(digits_task.teacher())
    served = OnnxRuntimeModel(export_onnx(teacher, digits_task, tmp_path / "t.onnx"))
    batch = digits_task.example_inputs()
    for rows in (1, 3):  # the graph was traced on another batch size
        part = {k: v[:rows] for k, v in batch.items()}
        with torch.no_grad():
            expected = digits_task.forward(teacher, part).main
            got = digits_task.forward(served, part).main
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="called as when it was exported"):
        served(batch["images"], extra=True)


def test_export_model_cli_writes_a_checked_file_and_its_report(w8a8, tmp_path, capsys):
    import json

    from compsearch.cli import main

    folder = tmp_path / "final"
    w8a8.save(folder / "model.safetensors")
    assert main(["export-model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "layers on ONNX Runtime integer kernels" in out and "accuracy (test split)" in out
    report = json.loads((folder / "model.json").read_text())
    assert report["size_bytes"] == os.path.getsize(folder / "model.onnx")
    assert report["relative_error"] <= report["tolerance"] == TOLERANCE["integer"]
    assert set(report["metrics_served"]) == set(report["metrics_torch"])


def test_a_failed_check_or_export_writes_nothing(w8a8, tmp_path, monkeypatch, digits_task):
    import compsearch.exports.artifact as artifact

    folder = tmp_path / "final"
    w8a8.save(folder / "model.safetensors")
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setattr(artifact, "output_error", lambda *a: 0.5)
    with pytest.raises(ExportError, match="differ by 0.5; nothing was written"):
        export_model(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    with pytest.raises(ExportError, match="expected a file name ending in .onnx"):
        export_model(folder, out=folder / "model.bin")
    with pytest.raises(ExportError, match="expected one of onnx"):
        export_model(folder, format="tflite")

    class Broken(torch.nn.Module):  # torch.export cannot trace data-dependent control flow
        def forward(self, images):
            return images.flatten(1)[:, :10] if images.sum() > 0 else images.flatten(1)[:, :5]

    with pytest.raises(ExportError, match="ONNX export of Broken failed .*nothing was written"):
        export_onnx(Broken(), digits_task, folder / "broken.onnx")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    from compsearch.search.config import parse_config

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'compsearch\[onnx\]'"):
        require_onnx()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))  # fmt: skip
    config = {"study": "s", "task": "digits", "latency": {"runtime": "onnxruntime"}}
    with pytest.raises(ConfigError, match=r"onnxruntime not installed\): pip install 'compsearch"):
        parse_config(config, "c.yaml")


@pytest.mark.parametrize("latency, device, message", [
    ({"runtime": "onnxruntime", "mode": "table"}, "cpu", "expected latency.mode: measured"),
    ({"runtime": "onnxruntime"}, "cuda", "onnxruntime is timed on the CPU"),
    ({"runtime": "tensorrt"}, "cpu", "runtime"),
])  # fmt: skip
def test_runtime_settings_that_cannot_work_are_refused(latency, device, message):
    from compsearch.search.config import parse_config

    config = {"study": "s", "task": "digits", "device": device, "latency": latency}
    with pytest.raises(ConfigError, match=message):
        parse_config(config, "c.yaml")


def test_onnxruntime_latency_times_sessions_of_candidate_and_teacher(w8a8, digits_task):
    from compsearch.kernels.deploy import to_deploy
    from compsearch.objectives import Candidate, MeasureSetup
    from compsearch.objectives.latency import LatencyObjective

    objective = LatencyObjective.build(MeasureSetup(digits_task, repeats=4, runtime="onnxruntime"))
    objective.max_repeats = 8
    teacher, _ = to_deploy(digits_task.teacher())
    objective.prepare(Candidate(digits_task, teacher, b""))
    measured = objective.measure(Candidate(digits_task, w8a8.deployed, b""))
    assert measured["latency_runtime"] == "onnxruntime"
    assert measured["latency_ms"] > 0 and measured["teacher_latency_ms"] > 0
    served = objective.served(w8a8.deployed, digits_task)
    assert isinstance(served, OnnxRuntimeModel)
    assert isinstance(objective.served(teacher, digits_task), OnnxRuntimeModel)
    assert objective.served(w8a8.deployed, digits_task) is served  # exported once per model
    scratch = served.exported.path.parent
    another, _ = to_deploy(digits_task.teacher())
    objective.served(another, digits_task)
    assert not served.exported.path.exists()  # the previous candidate's graph is gone
    assert len(list(scratch.glob("*.onnx"))) == 2  # the teacher's and the newest candidate's


def test_final_report_with_onnxruntime_gives_its_latency_and_metrics(w8a8, digits_task):
    from compsearch.final import measure, report_markdown

    measured = measure(digits_task, w8a8.deployed, w8a8.artifact_bytes(), w8a8.student,
                       repeats=4, runtime="onnxruntime")  # fmt: skip
    for values in (measured.teacher, measured.compressed):
        assert 0.9 <= values["accuracy_onnxruntime"] <= 1.0
    assert measured.compressed["latency_runtime"] == "onnxruntime"
    text = report_markdown("w8a8", w8a8.recipe, measured, "accuracy")
    assert "latency (measured, ONNX Runtime)" in text and "accuracy_onnxruntime" in text


class _RowsTask:
    """Just what an export reads from a task: how the model is called, and on what."""

    def forward(self, model, batch, attentions=False):
        from compsearch.tasks.base import Outputs

        return Outputs(logits=model(batch["x"], scale=None)[0])

    def example_inputs(self):
        return {"x": torch.arange(20.0).reshape(4, 5)}


class _LoopsOverRows(torch.nn.Module):
    """Loops over its batch in Python (Llava does, over images): the trace unrolls it."""

    def forward(self, x, scale=None):
        rows = [row * 2 + index for index, row in enumerate(x)]
        return torch.stack(rows), None  # a None among the outputs stays a None


def test_a_graph_unrolled_over_the_batch_is_traced_again_for_other_shapes(tmp_path):
    model, task = _LoopsOverRows(), _RowsTask()
    served = OnnxRuntimeModel(export_onnx(model, task, tmp_path / "loop.onnx"))
    for rows in (4, 3, 3, 6):
        x = torch.randn(rows, 5)
        got, nothing = served(x, scale=None)
        assert nothing is None
        assert torch.allclose(got, model(x)[0], atol=1e-6)
    assert served.retraced == [((3, 5),), ((6, 5),)]  # each other shape traced once


def test_a_study_with_onnxruntime_times_every_trial_there(tmp_path, runs_root):
    import json
    import uuid

    import yaml

    from compsearch.cli import main

    name = f"ort-{uuid.uuid4().hex[:6]}"
    config = {
        "study": name, "task": "digits", "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"runtime": "onnxruntime", "repeats": 3, "warmup": 1, "ci": 0},
        "space": {"w_bits": [8, 16], "a_bits": [8, 16], "calibration_batches": 1},
        "search": {"sampler": "random", "trials": 2, "finetune_steps": 2, "cache_batches": 2,
                   "baselines": False, "plans": 0},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["search", str(path)]) == 0
    trials = sorted((runs_root / name / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        measured = json.loads((trial / "metrics.json").read_text())["measured"]
        assert measured["latency_runtime"] == "onnxruntime"
        assert measured["latency_ms"] > 0 and measured["speedup"] > 0


def test_int8_input_levels_in_onnx_runtime_are_compsearch_levels(tmp_path):
    """One layer, no depth to compound rounding: ONNX Runtime computes the deploy form's numbers,
    including inputs far below the calibrated range (compsearch's levels stop at -127, ONNX's
    uint8 saturation at -128: the export clips first)."""
    from compsearch.kernels.deploy import to_deploy
    from compsearch.kernels.observers import calibrate
    from compsearch.kernels.quant import quantize_

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(layer, {"0": LayerPlan(w_bits=8, a_bits=8)}, activation_mode="static")
    calibrate(layer, [torch.randn(8, 64)], lambda m, b: m(b))
    deployed, _ = to_deploy(layer)

    class Task:
        def forward(self, model, batch, attentions=False):
            from compsearch.tasks.base import Outputs

            return Outputs(logits=model(batch["x"]))

        def example_inputs(self):
            return {"x": torch.randn(16, 64)}

    served = OnnxRuntimeModel(export_onnx(deployed, Task(), tmp_path / "one.onnx"))
    x = torch.randn(16, 64) * 4  # many values saturate, on both sides
    with torch.no_grad():
        expected, got = deployed(x), served(x)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
