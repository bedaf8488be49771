import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from optuna.trial import TrialState

from compsearch.errors import ConfigError

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


def config(tmp_path, name, steps, trials=6, **search):
    data = {
        "study": name,
        "task": "digits",
        "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 3, "warmup": 1},
        "constraints": {"accuracy_drop": "10%"},
        "space": {"w_bits": [4, 8, 16], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25},
                  "calibration_batches": 1},
        "search": {"driver": "ray", "sampler": "random", "trials": trials, "finetune_steps": steps,
                   "cache_batches": 2, "ray": {"max_concurrent": 2}, **search},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load(runs_root, name):
    from compsearch.search import StudyFolder
    from compsearch.search.study import open_study

    folder = StudyFolder(runs_root / name)
    return open_study(folder.frozen(), folder)


def test_ray_search_runs_the_trials_into_the_same_study(tmp_path, runs_root, capsys):
    from compsearch.cli import main

    name = f"ray-{uuid.uuid4().hex[:6]}"
    try:
        assert main(["search", str(config(tmp_path, name, 6, trials=4))]) == 0
    finally:
        ray.shutdown()
    trials = load(runs_root, name).get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].user_attrs["baseline"] == "int8"
    assert main(["pareto", str(runs_root / name)]) == 0
    header = (runs_root / name / "pareto.csv").read_text().splitlines()[0]
    assert header.startswith("trial,accuracy,latency_ms,size_bytes,accuracy_drop,speedup")
    assert (runs_root / name / "trials" / "00003" / "metrics.json").exists()


def test_halving_under_ray_prunes_stopped_trials_and_reruns_none(tmp_path, runs_root):
    from compsearch.cli import main

    name = f"rayh-{uuid.uuid4().hex[:6]}"
    path = config(tmp_path, name, 9, trials=6, baselines=False,
                  halving={"enabled": True, "eta": 3, "min_steps": 3})  # fmt: skip
    try:
        assert main(["search", str(path)]) == 0
        trials = load(runs_root, name).get_trials()
        states = [t.state for t in trials]
        assert (
            len(trials) == 6 and TrialState.FAIL not in states and TrialState.RUNNING not in states
        )
        stopped = [t for t in trials if t.state == TrialState.PRUNED]
        assert stopped, "with eta 3, some of 6 trials stop early"
        for trial in stopped:
            assert "rung_0" in trial.user_attrs and trial.user_attrs["measured"]
        assert main(["search", str(path)]) == 0
    finally:
        ray.shutdown()
    again = load(runs_root, name).get_trials()
    assert [(t.number, t.state) for t in again] == [(t.number, t.state) for t in trials]
    assert not [t for t in again if "retry_of" in t.user_attrs], "no trial was re-run"


def _resumable(runs_root, name):
    """A trial that saved a fine-tuning checkpoint and has not finished."""
    for state in (runs_root / name / "trials").glob("*/checkpoints/stage-0/train-state.json"):
        if not (state.parents[2] / "metrics.json").exists():
            return state.parents[2].name
    return None


def test_killed_ray_driver_resumes_its_trials_from_their_checkpoints(tmp_path, runs_root):
    name = f"rayk-{uuid.uuid4().hex[:6]}"
    path = config(tmp_path, name, 1200, trials=3)
    process = subprocess.Popen([sys.executable, "-m", "compsearch", "search", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _resumable(runs_root, name):
            time.sleep(0.2)
        interrupted = _resumable(runs_root, name)
        assert interrupted, "no trial saved a checkpoint"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        process.wait(30)
    time.sleep(3)
    before = {t.number: t.values for t in load(runs_root, name).get_trials()
              if t.state == TrialState.COMPLETE}  # fmt: skip
    rerun = subprocess.run([sys.executable, "-m", "compsearch", "search", str(path)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    trials = load(runs_root, name).get_trials()
    counted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 3
    for number, values in before.items():
        assert trials[number].values == values
    retry = [t for t in trials if t.user_attrs.get("retry_of") == int(interrupted)]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs["resumed_from_step"] > 0, "continued from its checkpoint"
    assert not list((runs_root / name / "ray").glob("*/experiment_state-*.json")), "scratch removed"


def test_without_ray_the_ray_driver_names_the_extra(monkeypatch):
    from compsearch.search.driver import load_driver

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "compsearch.search.ray_driver", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'compsearch\[ray\]'"):
        load_driver("ray")
    assert load_driver("optuna").name == "optuna"


def test_importing_compsearch_does_not_import_ray():
    code = "import sys, compsearch, compsearch.search, compsearch.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.5:6379", "head-node:6379",
                                     "ray://head-node:10001"])  # fmt: skip
def test_every_address_form_is_accepted(address):
    from compsearch.search import parse_config

    data = {"study": "a", "task": "digits", "search": {"ray": {"address": address}}}
    assert parse_config(data).search.ray.address == address


@pytest.mark.parametrize("address", ["head-node", "ray://head-node", "http://head:6379"])
def test_an_address_without_a_port_names_the_forms(address):
    from compsearch.search import parse_config

    data = {"study": "a", "task": "digits", "search": {"ray": {"address": address}}}
    with pytest.raises(ConfigError, match=r"'host:port' \(a cluster's GCS\)"):
        parse_config(data)


def test_auto_is_refused_when_several_ray_clusters_run_here(monkeypatch):
    from ray._private import services

    from compsearch.search.ray_cluster import connect

    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def two_clusters():
        return {"10.0.0.5:6379", "10.0.0.5:6380"}

    two_clusters.cache_clear = lambda: None  # what ray.shutdown calls on the real one
    monkeypatch.setattr(services, "find_gcs_addresses", two_clusters)
    with pytest.raises(
        ConfigError, match=r"'auto' is ambiguous .* search.ray.address: '10.0.0.5:6379'"
    ):
        connect("auto")
    assert not ray.is_initialized()


class _LostTrial:
    """What Tune hands its callbacks about an errored trial: its config and the error text it
    wrote (a task error: a traceback ending with the original exception)."""

    def __init__(self, trial_id, folder):
        self.config = {"compsearch_trial_id": trial_id}
        self.error_file = str(folder / "error.txt")
        self.pickled_error_file = str(folder / "error.pkl")  # never read: nothing is unpickled
        (folder / "error.pkl").write_bytes(b"not a pickle")
        (folder / "error.txt").write_text(
            "Failure # 1 (occurred at 2026-12-01_01-00-00)\n"
            "ray::ImplicitFunc.train() (pid=1, ip=10.0.0.5)\n"
            '  File "trainable.py", line 3, in trainable\n'
            "FileNotFoundError: no such file: runs/x\n"
        )


def test_the_cause_of_a_lost_actor_is_its_first_line(tmp_path):
    from compsearch.search.ray_driver import _cause

    lost = _LostTrial(1, tmp_path)
    (tmp_path / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-12-01_01-00-00)\nFileNotFoundError: an older failure\n"
        "Failure # 2 (occurred at 2026-12-01_01-01-00)\n"
        "The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n"
    )
    assert _cause(lost) == "The actor died unexpectedly before finishing this task."


def test_a_trial_lost_before_its_run_is_retried_then_failed_with_its_cause(tmp_path, runs_root):
    """Tune's restarts and final errors (a dead actor, an error before the trial function ran)
    reach the study: each restart in ``retries``, the final error as ``fail_reason``, counted
    toward failure_limit, traceback in the trial's folder."""
    from compsearch.search import StudyFolder, parse_config
    from compsearch.search.ray_driver import RETRIES, TrialLog
    from compsearch.search.runner import failures
    from compsearch.search.study import open_study

    name = f"rayl-{uuid.uuid4().hex[:6]}"
    config = parse_config({"study": name, "task": "digits"})
    folder = StudyFolder(runs_root / name)
    folder.freeze(config)
    study = open_study(config, folder, ["maximize", "minimize", "minimize"])
    trial = study.ask()
    lost = _LostTrial(trial._trial_id, tmp_path)
    log = TrialLog(folder.path, max_retries=1)
    log.on_trial_recover(iteration=1, trials=[], trial=lost)
    assert study.trials[0].state == TrialState.RUNNING
    assert (
        study.trials[0].user_attrs[RETRIES][0]["cause"] == "FileNotFoundError: no such file: runs/x"
    )
    log.on_trial_error(iteration=2, trials=[], trial=lost)
    failed = study.trials[0]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == (
        "FileNotFoundError: no such file: runs/x (after 1 retries)"
    )
    assert failures(study) == 1, "it counts toward failure_limit"
    assert "Failure # 1" in (folder.path / "trials" / "00000" / "error.txt").read_text()
