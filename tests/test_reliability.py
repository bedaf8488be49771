"""Reliability and safety: exact budgets, clean refusals, nothing imported from a file, nothing
half-written, dead workers (on any host) recovered and their trials resumed from checkpoints."""

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState
from test_search import _wait, load, spawn, tiny, write

from compsearch._files import publish_folder, recover_folder, remove_stale_temporaries
from compsearch.cli import main
from compsearch.search.storage import budget_count


@pytest.mark.parametrize("trials", [1, 2, 3])
def test_the_budget_is_exact_even_below_the_number_of_baselines(tmp_path, runs_root, trials):
    name = f"b{trials}-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name, trials=trials, finetune_steps=2))
    assert main(["search", str(config)]) == 0
    assert main(["search", str(config)]) == 0, "resuming a finished study runs nothing more"
    study = load(runs_root, name)
    ran = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert len(ran) == trials and all(t.state == TrialState.COMPLETE for t in ran)
    assert [t.user_attrs.get("baseline") for t in ran] == ["int8", "4-bit", "keep 0.5 + int8"][
        :trials
    ]
    assert budget_count(study) == (trials, 0)


def test_trials_zero_on_the_command_line_is_refused(tmp_path, runs_root, capsys):
    name = f"z-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name))
    assert main(["search", str(config), "--trials", "0"]) == 2
    assert f"{config}: search.trials: expected an integer in [1, 1000000], but got 0." in (
        capsys.readouterr().err
    )
    assert not (runs_root / name).exists()


def test_a_yaml_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("study: x\ntask: digits\nsearch: {trials: 3\n")
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}:4:1: expected YAML, but it does not parse:")


def test_error_paths_name_the_file_then_the_field(tmp_path, capsys):
    path = write(tmp_path, {**tiny("p"), "search": {"trials": "ten"}})
    assert main(["search", str(path)]) == 2
    assert f"{path}: search.trials: expected an integer" in capsys.readouterr().err


def test_in_memory_sqlite_is_refused_before_anything_runs(tmp_path, runs_root, capsys):
    name = f"m-{uuid.uuid4().hex[:6]}"
    assert main(["search", str(write(tmp_path, tiny(name, storage="sqlite://")))]) == 2
    assert "a storage that outlives this process" in capsys.readouterr().err
    assert not (runs_root / name).exists()


def test_a_bad_storage_url_fails_in_under_two_seconds_leaving_no_folder(
    tmp_path, runs_root, capsys
):
    name = f"u-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name, storage="postgresql://nobody@127.0.0.1:1/none"))
    started = time.monotonic()
    assert main(["search", str(config)]) == 2
    assert time.monotonic() - started < 2.0
    assert "expected a reachable study storage" in capsys.readouterr().err
    assert not (runs_root / name).exists(), "nothing written: fix the URL and rerun"


# -- loading never imports what a file names ---------------------------------------------------------


def _artifact_naming(task_spec: str, runs_root, digits_task, tmp_path):
    """A digits artifact whose recipe says it belongs to ``task_spec`` (a crafted file)."""
    import dataclasses

    from compsearch.kernels.packing import export_packed, save_packed
    from compsearch.pipeline import artifact_metadata, compress
    from compsearch.recipes import LayerPlan, Recipe

    recipe = Recipe(layers={"fc1": LayerPlan(w_bits=8)})
    result = compress(digits_task, recipe, steps=0)
    crafted = dataclasses.replace(
        result.recipe, provenance=dataclasses.replace(result.recipe.provenance, task=task_spec)
    )
    path = tmp_path / "crafted" / "model.safetensors"
    save_packed(
        export_packed(result.student), path, artifact_metadata(crafted, result.prune_record)
    )
    return path


def test_loading_a_crafted_artifact_imports_nothing(tmp_path, runs_root, digits_task):
    path = _artifact_naming("this:d", runs_root, digits_task, tmp_path)
    code = (
        "import sys, compsearch\n"
        "from compsearch.errors import TaskError\n"
        f"try:\n    compsearch.load({str(path)!r})\nexcept TaskError as e:\n    print('refused:', e)\n"
        "print('imported' if 'this' in sys.modules else 'not imported')\n"
    )
    env = {**os.environ, "COMPSEARCH_RUNS": str(runs_root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120).stdout  # fmt: skip
    assert "refused: the recipe names the task 'this:d'" in out and "--trust-task" in out
    assert out.strip().endswith("not imported"), out
    assert main(["evaluate", str(path)]) == 2


def test_a_trusted_task_that_is_not_a_task_is_a_clean_error(tmp_path, runs_root, digits_task):
    from compsearch.errors import TaskError
    from compsearch.final import load

    path = _artifact_naming("os:getcwd", runs_root, digits_task, tmp_path)
    with pytest.raises(TaskError, match="expected a factory that takes the keyword argument"):
        load(path, trust_task=True)
    assert load(path, task="digits") is not None, "--task given explicitly is the user's word"


# -- nothing half-written ------------------------------------------------------------------------------


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    stale = tmp_path / "trials" / "00001" / ".metrics.json.abc.tmp"
    fresh = tmp_path / ".config.yaml.def.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("half")
    fresh.write_text("being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and fresh.exists()


def test_a_final_folder_is_published_whole_and_a_kill_part_way_is_finished(tmp_path):
    target = tmp_path / "knee"
    (target / "checkpoints").mkdir(parents=True)
    (target / "model.safetensors").write_text("old")
    (target / "report.json").write_text("old")
    staging = tmp_path / ".knee.staging-1"
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    (staging / "report.json").write_text("new")
    publish_folder(staging, target, keep=("checkpoints",))
    assert (target / "model.safetensors").read_text() == "new"
    assert (target / "report.json").read_text() == "new" and (target / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knee"]
    # killed between the two renames: the old folder is put back, whole
    old = tmp_path / ".knee.old"
    os.replace(target, old)
    recover_folder(target)
    assert (target / "model.safetensors").read_text() == "new" and not old.exists()


def test_an_export_folder_killed_part_way_is_finished_and_its_scratch_swept(tmp_path):
    from compsearch.exports.hf_checkpoint import folder_written_atomically

    target = tmp_path / "checkpoint"
    old = tmp_path / ".checkpoint.old"  # killed between the two renames of the last export
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    stale, fresh = tmp_path / ".checkpoint.scratch-dead", tmp_path / ".checkpoint.scratch-live"
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(RuntimeError), folder_written_atomically(target) as scratch:
        assert (target / "model.safetensors").read_text() == "previous"  # put back first
        (scratch / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert (target / "model.safetensors").read_text() == "previous"
    assert not stale.exists() and fresh.exists()  # a live writer's scratch folder is left alone
    with folder_written_atomically(target) as scratch:
        (scratch / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.scratch-live", "checkpoint"]


# -- dead workers on any host ------------------------------------------------------------------------


def test_a_remote_worker_that_died_is_recovered_and_its_trial_resumed(tmp_path, runs_root):
    name = f"hb-{uuid.uuid4().hex[:6]}"
    data = tiny(name, trials=1, storage="journal", finetune_steps=400, baselines=False,
                heartbeat_grace=5)  # fmt: skip
    config = write(tmp_path, data)
    process = spawn("search", str(config))
    saved = runs_root / name / "trials" / "00000" / "checkpoints" / "stage-0" / "train-state.json"
    try:
        _wait(saved.exists, 240, "the trial's first fine-tuning checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    study = load(runs_root, name)
    (dead,) = study.get_trials()
    assert dead.state == TrialState.RUNNING and "heartbeat" in dead.user_attrs
    # make it look like a worker on another machine: no lock file here tells that it died
    study._storage.set_trial_user_attr(dead._trial_id, "worker", "elsewhere-1-0000")
    study._storage.set_trial_user_attr(dead._trial_id, "heartbeat", time.time() - 60)
    worker = subprocess.run([sys.executable, "-m", "compsearch", "worker", str(runs_root / name)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    trials = load(runs_root, name).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "its worker died"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["resumed_from_step"] >= 100, (
        "continued from the dead trial's checkpoint"
    )
    assert not (runs_root / name / "trials" / f"{retry.number:05d}" / "checkpoints").exists()

    # the same parameters, never interrupted, in a study of their own
    reference = f"{name}-ref"
    ref_data = {**data, "study": reference, "search": {**data["search"], "storage": None}}
    ref_config = write(tmp_path, ref_data)
    from compsearch.search import StudyFolder, load_driver, read_config
    from compsearch.search.prepare import prepare_study

    ref = read_config(ref_config)
    _, ref_study = prepare_study(ref, StudyFolder(runs_root / reference))
    ref_study.enqueue_trial(dead.params)
    load_driver("optuna")(ref, StudyFolder(runs_root / reference)).run()
    (straight,) = load(runs_root, reference).get_trials()
    resumed, uninterrupted = retry.user_attrs["measured"], straight.user_attrs["measured"]
    for key in ("accuracy", "nll", "params", "macs"):
        assert resumed[key] == uninterrupted[key], key
    # the artifacts differ only in the provenance their recipes carry (study name, trial number)
    assert abs(resumed["size_bytes"] - uninterrupted["size_bytes"]) < 32


def test_a_running_trial_with_a_fresh_heartbeat_is_left_alone(tmp_path, runs_root):
    from compsearch.search.storage import WorkerIdentity, recover_stale

    folder = runs_root / f"alive-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}")
    alive, silent = study.ask(), study.ask()
    for trial, beat in ((alive, time.time()), (silent, time.time() - 500)):
        trial.set_user_attr("worker", "elsewhere-2-0000")
        trial.set_user_attr("heartbeat", beat)
    me = WorkerIdentity(folder)
    try:
        assert recover_stale(study, me, grace_s=120) == [silent.number]
    finally:
        me.close()
    states = {t.number: t.state for t in study.get_trials()}
    assert states[alive.number] == TrialState.RUNNING and states[silent.number] == TrialState.FAIL


def test_top_k_beyond_the_exported_points_says_so(tmp_path, runs_root, capsys):
    name = f"k-{uuid.uuid4().hex[:6]}"
    data = {**tiny(name, trials=1, finetune_steps=2, baselines=False), "constraints": {}}
    data["final"] = {"steps": 2, "checkpoint_every": 1}
    assert main(["search", str(write(tmp_path, data))]) == 0
    folder = runs_root / name
    assert main(["export", str(folder), "--best", "accuracy", "--name", "only"]) == 0
    capsys.readouterr()
    assert main(["train", "--from-study", str(folder), "--top-k", "5", "--steps", "2"]) == 0
    assert "note: --top-k 5, but the study has 1 distinct exported point; training 1" in (
        capsys.readouterr().out
    )
    assert main(["export", str(folder), "--diverse", "-1"]) == 2
