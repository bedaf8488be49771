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
        assert main(["search", str(config(tmp_path, name, 6))]) == 0
    finally:
        ray.shutdown()
    trials = load(runs_root, name).get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].user_attrs["baseline"] == "int8"
    assert main(["pareto", str(runs_root / name)]) == 0
    header = (runs_root / name / "pareto.csv").read_text().splitlines()[0]
    assert header.startswith("trial,accuracy,latency_ms,size_bytes,accuracy_drop,speedup")
    assert (runs_root / name / "trials" / "00005" / "metrics.json").exists()


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
    """A trial that saved a fine-tuning checkpoint, has not finished, and that Tune's experiment
    state already knows (Tune snapshots it every TUNE_GLOBAL_CHECKPOINT_S)."""
    snapshots = list((runs_root / name / "ray" / "tune").glob("experiment_state-*.json"))
    if not snapshots:
        return None
    snapshot = max(p.stat().st_mtime for p in snapshots)
    for state in (runs_root / name / "trials").glob("*/checkpoints/stage-0/train-state.json"):
        trial_dir = state.parents[2]
        if not (trial_dir / "metrics.json").exists() and state.stat().st_mtime < snapshot:
            return trial_dir.name
    return None


def test_killed_ray_driver_is_restored_and_resumes_trials(tmp_path, runs_root):
    name = f"rayk-{uuid.uuid4().hex[:6]}"
    path = config(tmp_path, name, 3000)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    process = subprocess.Popen([sys.executable, "-m", "compsearch", "search", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _resumable(runs_root, name):
            time.sleep(0.2)
        interrupted = _resumable(runs_root, name)
        assert interrupted, "no trial saved a checkpoint that Tune recorded"
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
    assert len(counted) >= 6
    for number, values in before.items():
        assert trials[number].values == values
    resumed = [t for t in trials if t.user_attrs.get("resumed_from_step", 0) > 0]
    assert int(interrupted) in [t.number for t in resumed], "continued from its checkpoint"


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
