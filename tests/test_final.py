import dataclasses
import json
import os
import uuid

import pytest
import torch
import yaml

import compsearch
from compsearch.cli import main
from compsearch.errors import ConfigError, KernelError, RecipeError
from compsearch.final import evaluate, train_recipe
from compsearch.recipes import read_recipe, write_recipe


@pytest.fixture(scope="module")
def mnist_study(tmp_path_factory, runs_root, mnist_task):
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    config = {
        "study": name,
        "task": "mnist",
        "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 3, "warmup": 1},
        "constraints": {"accuracy_drop": "50%"},
        "space": {"w_bits": [4, 8], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.5},
                  "calibration_batches": 1},
        "search": {"sampler": "random", "trials": 3, "finetune_steps": 10, "cache_batches": 4},
        "final": {"steps": 20, "checkpoint_every": 5},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("cfg") / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["search", str(path)]) == 0
    return runs_root / name


def test_search_export_train_load_evaluate_end_to_end(mnist_study, mnist_task, capsys):
    assert main(["export", str(mnist_study), "--knee"]) == 0
    recipe_path = mnist_study / "recipes" / "knee.yaml"
    recipe = read_recipe(recipe_path)
    assert recipe.provenance.study == mnist_study.name
    assert "accuracy" in recipe.provenance.measured
    run = train_recipe(recipe_path, steps=20, checkpoint_every=5)
    assert run.path == mnist_study / "final" / "knee"
    for name in ("model.safetensors", "recipe.yaml", "report.json", "report.md"):
        assert (run.path / name).exists(), name
    loaded = compsearch.load(run.path)
    batch = mnist_task.calibration_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(mnist_task.forward(loaded, batch).logits,
                           mnist_task.forward(run.deployed, batch).logits)  # fmt: skip
    from compsearch.search.study import StudyFolder

    bounds = StudyFolder(mnist_study).frozen().constraints  # the final run takes its bounds
    measured = evaluate(run.path, bounds=bounds)
    test = mnist_task.evaluate(loaded, "test")["accuracy"]
    validation = mnist_task.evaluate(loaded, "validation")["accuracy"]
    assert measured.compressed["accuracy"] == pytest.approx(test), "reports are on the test split"
    assert measured.compressed["accuracy_validation"] == pytest.approx(validation)
    assert measured.teacher["accuracy"] == pytest.approx(
        mnist_task.evaluate(mnist_task.teacher(), "test")["accuracy"]
    )
    file_bytes = os.path.getsize(run.path / "model.safetensors")
    assert measured.compressed["size_bytes"] == file_bytes, "size is the shipped file, exactly"
    assert run.measurements.compressed["size_bytes"] == file_bytes
    report = json.loads((run.path / "report.json").read_text())
    assert report["compressed"]["size_bytes"] == file_bytes
    assert "accuracy (test split)" in (run.path / "report.md").read_text()
    floats = report["float_weights"]  # every weight left in float is listed, with why
    assert 0 <= floats["share"] < 1 and all(isinstance(r, str) for r in floats["tensors"].values())
    if floats["tensors"]:
        assert "Weights kept in float" in (run.path / "report.md").read_text()
    assert measured.compressed["size_bytes"] < measured.teacher["size_bytes"]
    # both latencies from the same interleaved runs as the speed-up, the teacher alone beside
    assert measured.teacher["latency_ms"] == measured.compressed["teacher_latency_ms"]
    assert measured.teacher["latency_ms_alone"] > 0
    assert "accuracy_drop" in measured.constraints
    assert main(["evaluate", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "constraint accuracy drop <= 50%" in out, "the study's bounds"


def test_resumed_final_run_gives_the_same_artifact(mnist_study, tmp_path):
    assert main(["export", str(mnist_study), "--best", "accuracy", "--name", "resume"]) == 0
    path = mnist_study / "recipes" / "resume.yaml"
    straight = train_recipe(path, steps=20, name="straight", checkpoint_every=5)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 13:
            raise Killed

    with pytest.raises(Killed):
        train_recipe(path, steps=20, name="resumed", checkpoint_every=5, progress=kill)
    assert not (mnist_study / "final" / "resumed" / "model.safetensors").exists()
    resumed = train_recipe(path, steps=20, name="resumed", checkpoint_every=5, resume=True)
    from safetensors import safe_open

    def content(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118

    (a, meta_a), (b, meta_b) = content(straight.path), content(resumed.path)
    assert meta_a == meta_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_clearly_and_overwrite_nothing(mnist_study, tmp_path):
    assert main(["export", str(mnist_study), "--knee", "--name", "guard"]) == 0
    path = mnist_study / "recipes" / "guard.yaml"
    first = train_recipe(path, steps=2, name="guard")
    artifact = (first.path / "model.safetensors").read_bytes()
    recipe = read_recipe(path)
    other = dataclasses.replace(recipe, provenance=dataclasses.replace(
        recipe.provenance, model_fingerprint="sha256:" + "0" * 16))  # fmt: skip
    wrong = write_recipe(other, tmp_path / "guard.yaml")
    with pytest.raises(RecipeError, match="recipe was made for sha256:0000"):
        train_recipe(wrong, steps=2, name="guard")
    truncated = tmp_path / "cut.yaml"
    text = path.read_text()
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(RecipeError, match="truncated"):
        train_recipe(truncated, steps=2, name="guard")
    assert (first.path / "model.safetensors").read_bytes() == artifact
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(artifact[: len(artifact) // 3])
    with pytest.raises(KernelError, match="cannot be read"):
        evaluate(broken)


def test_export_rule_nobody_meets_shows_the_nearest_points(mnist_study, capsys):
    assert (
        main(["export", str(mnist_study), "--best", "accuracy", "--where", "latency_ms <= 0.001"])
        == 2
    )
    err = capsys.readouterr().err
    assert "no feasible front point has latency_ms <= 0.001. Nearest: trial" in err
    with pytest.raises(ConfigError, match="expected 'NAME OP VALUE'"):
        from compsearch.search.select import parse_bound

        parse_bound("latency is small", "accuracy", {})


def test_train_top_k_from_a_study_reports_the_best(mnist_study, capsys):
    assert main(["train", "--from-study", str(mnist_study), "--top-k", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    reports = {p.parent.name: json.loads(p.read_text())
               for p in (mnist_study / "final").glob("*/report.json")}  # fmt: skip
    trained = {n: r for n, r in reports.items() if r["steps"] == 3}  # other runs took 20 steps
    assert len(trained) == 2, f"two recipes trained with 3 steps, got {sorted(trained)}"

    def rank(name):
        r = reports[name]
        feasible = all(c["met"] for c in r["constraints"].values())
        return (feasible, r["compressed"]["accuracy"], -r["compressed"]["latency_ms"])

    winner = max(trained, key=rank)
    assert f"best after full training ({mnist_study.name}): {winner} —" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--from-study", "x", "--top-k", "0"], "--top-k: expected a count of at least 1"),
        (["train", "r.yaml", "--checkpoint-every", "0"], "--checkpoint-every: expected a step count"),
        (["train", "r.yaml", "--steps", "-1"], "--steps: expected a step count of at least 0"),
    ],
)  # fmt: skip
def test_train_refuses_nonsense_numbers_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_evaluate_on_cuda_without_cuda_is_one_clear_line(mnist_study, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["evaluate", str(mnist_study / "final" / "knee"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device: expected a CUDA device for 'cuda', but torch sees none" in err
    assert len(err.strip().splitlines()) == 1
