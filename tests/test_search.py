import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from compsearch.cli import main
from compsearch.errors import ConfigError
from compsearch.search import StudyFolder, load_results, parse_config
from compsearch.search.halving import Rungs, promotable
from compsearch.search.pareto import crowding, hypervolume, ranks
from compsearch.search.storage import budget_count
from compsearch.search.study import open_study
from compsearch.search.trial import _confirm_latency


def tiny(study: str, **search) -> dict:
    return {
        "study": study,
        "task": "digits",
        "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 3, "warmup": 1, "ci": 0},
        "constraints": {"accuracy_drop": "10%"},
        "space": {"w_bits": [4, 8, 16], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25},
                  "calibration_batches": 1},
        "search": {"sampler": "random", "trials": 3, "finetune_steps": 4, "cache_batches": 2,
                   **search},
    }  # fmt: skip


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['study']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load(runs_root: Path, name: str) -> optuna.Study:
    folder = StudyFolder(runs_root / name)
    return open_study(folder.frozen(), folder)


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compsearch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"serach": {}}, "config: unknown key 'serach'"),
        ({"search": {"trials": "ten"}}, "config.search.trials: expected an integer"),
        ({"search": {"sampler": "cmaes"}}, "config.search.sampler: expected one of 'surrogate', 'nsga2'"),
        ({"search": {"storage": "ftp://x"}}, "config.search.storage: expected 'journal'"),
        ({"search": {"finetune_steps": 10, "halving": {"enabled": True, "min_steps": 10}}},
         "search.halving.min_steps: expected fewer than search.finetune_steps"),
        ({"objectives": ["latency_ms"]}, "config.objectives: expected 'accuracy' and at least one"),
        ({"constraints": {"latency_ms": "fast"}}, "config.constraints.latency_ms: expected a time"),
        ({"space": {"keep_ratio": 2}}, "config.space.keep_ratio: expected a number in (0.0, 1.0]"),
        ({"study": "a b"}, "config.study: expected a name of letters"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_with_the_field_named(change, message):
    data = tiny("bad")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


# -- pareto and halving ----------------------------------------------------------------------------


def test_hypervolume_matches_known_values():
    assert hypervolume([(1, 2), (2, 1)], (3, 3)) == pytest.approx(3.0)
    assert hypervolume([(0, 0, 0)], (1, 1, 1)) == pytest.approx(1.0)
    assert hypervolume([(0, 0.5, 0.5), (0.5, 0, 0)], (1, 1, 1)) == pytest.approx(0.625)
    assert hypervolume([(2, 2)], (1, 1)) == 0.0  # beyond the reference: no volume
    assert hypervolume([(1, 2), (2, 1), (2, 2)], (3, 3)) == pytest.approx(3.0)  # dominated adds 0


def test_hypervolume_agrees_with_an_independent_monte_carlo_estimate():
    rng = random.Random(0)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(12)]
    exact = hypervolume(points, (1, 1, 1))
    samples = [tuple(rng.random() for _ in range(3)) for _ in range(60_000)]
    covered = sum(any(all(p[i] <= s[i] for i in range(3)) for p in points) for s in samples)
    assert exact == pytest.approx(covered / len(samples), abs=0.01)


def test_non_dominated_ranks_and_crowding():
    points = [(0, 1), (1, 0), (1, 1), (2, 2)]
    assert ranks(points) == [0, 0, 1, 2]
    assert crowding([(0, 2), (1, 1), (2, 0)])[1] == pytest.approx(2.0)


def test_rungs_and_promotion():
    assert Rungs.plan(150, 3).steps == (50,)  # 150 / 9 would be under 32 steps
    assert Rungs.plan(1000, 3).steps == (111, 333, 999)
    assert Rungs.plan(100, 3, min_steps=10).steps == (10, 30, 90)
    records = {0: ((0.1, 1.0), 0.0), 1: ((0.5, 1.0), 0.0), 2: ((0.9, 1.0), 0.0)}
    assert promotable(0, records, 3) and not promotable(1, records, 3)
    assert promotable(1, {1: ((0.5, 1.0), 0.0)}, 3), "alone at a rung, the best continues"
    infeasible = {0: ((0.0, 0.0), 1.0), 1: ((0.5, 0.5), 0.0), 2: ((0.9, 0.9), 0.0)}
    assert promotable(1, infeasible, 3) and not promotable(0, infeasible, 3)


def test_an_infeasible_point_never_demotes_a_feasible_one_at_a_rung():
    # trial 0 is infeasible and dominates trial 1; among feasible trials 1 and 2 are both on the
    # front. Ranked together with 0, trial 1 would fall to rank 1 and lose its place to 2.
    records = {
        0: ((0.1, 0.1), 1.0),
        1: ((0.3, 0.3), 0.0),
        2: ((0.9, 0.05), 0.0),
        3: ((0.95, 0.95), 0.0),
    }
    assert promotable(1, records, 3) and not promotable(2, records, 3)
    assert not promotable(0, records, 3), "infeasible trials come after every feasible one"
    worse = {0: ((0.1, 0.1), 2.0), 1: ((0.9, 0.9), 0.5), 2: ((0.95, 0.95), 3.0)}
    assert promotable(1, worse, 3), "among infeasible trials the smallest violation continues"


# -- studies ---------------------------------------------------------------------------------------


def test_search_runs_baselines_first_and_writes_its_files(tmp_path, runs_root, capsys):
    config = write(tmp_path, tiny(f"s-{uuid.uuid4().hex[:6]}", trials=4))
    assert main(["search", str(config)]) == 0
    name = yaml.safe_load(config.read_text())["study"]
    study = load(runs_root, name)
    trials = study.get_trials()
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == [
        "int8",
        "4-bit",
        "keep 0.5 + int8",
    ]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    # stored where Optuna's samplers and optuna-dashboard both read them, named by the study
    assert all(list(t.system_attrs["constraints"]) == list(t.constraints.values()) for t in trials)
    assert all(len(t.constraints) == 1 for t in trials)
    assert study.user_attrs["compsearch"]["constraint_names"] == ["accuracy_drop"]
    assert study.metric_names == ["accuracy", "latency_ms", "size_bytes"]
    assert all(t.intermediate_values and t.user_attrs["recipe"].endswith("recipe.yaml")
               for t in trials)  # fmt: skip
    folder = runs_root / name
    assert (folder / "config.yaml").exists() and (folder / "config.sha256").exists()
    assert (folder / "trials" / "00003" / "recipe.yaml").exists()
    assert main(["pareto", str(folder)]) == 0
    header = (folder / "pareto.csv").read_text().splitlines()[0]
    assert header.startswith("trial,accuracy,latency_ms,size_bytes,accuracy_drop,speedup")
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "complete 4" in out and "hypervolume" in out


def test_changed_config_on_resume_is_refused_and_storage_untouched(tmp_path, runs_root, capsys):
    name = f"r-{uuid.uuid4().hex[:6]}"
    data = tiny(name, trials=2)
    config = write(tmp_path, data)
    assert main(["search", str(config)]) == 0
    db = runs_root / name / "study.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    changed = {**data, "space": {**data["space"], "w_bits": [2, 8]}}
    assert main(["search", str(write(tmp_path, changed))]) == 2
    err = capsys.readouterr().err
    assert "space.w_bits: [4, 8, 16] -> [2, 8]" in err
    typo = {**data, "search": {**data["search"], "trails": 3}}
    assert main(["search", str(write(tmp_path, typo))]) == 2
    assert "unknown key 'trails'" in capsys.readouterr().err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    more = {**data, "search": {**data["search"], "trials": 3}}  # a safe change: resumes
    assert main(["search", str(write(tmp_path, more))]) == 0
    assert budget_count(load(runs_root, name))[0] == 3


def test_failing_trials_are_recorded_and_the_failure_limit_stops(tmp_path, runs_root, monkeypatch):
    from compsearch.search import trial as trial_module

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trial_module, "compress", broken)
    name = f"f-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name, trials=5, failure_limit=2))
    assert main(["search", str(config)]) == 1, "short of its trials: the exit code says so"
    trials = load(runs_root, name).get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: out of memory (simulated)"
    assert len([t for t in trials if t.state != TrialState.WAITING]) == 2


@pytest.mark.parametrize(
    "error",
    [IndexError("list index out of range"), KeyError("logits"), OSError("disk full"),
     TypeError("forward() got an unexpected keyword"), ZeroDivisionError("division by zero")],
)  # fmt: skip
def test_any_exception_fails_one_trial_not_the_study(tmp_path, runs_root, monkeypatch, error):
    from compsearch.search import trial as trial_module

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    real = trial_module.compress
    monkeypatch.setattr(trial_module, "compress", flaky)
    name = f"e-{uuid.uuid4().hex[:6]}"
    assert main(["search", str(write(tmp_path, tiny(name, trials=3, baselines=False)))]) == 0
    trials = load(runs_root, name).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"] == f"{type(error).__name__}: {error}"


def test_a_nan_objective_fails_its_trial_once_and_is_never_retried(
    tmp_path, runs_root, monkeypatch
):
    from compsearch.objectives import AccuracyObjective

    def nan_metric(self, candidate):
        return {self.name: float("nan")}

    name = f"n-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name, trials=3, baselines=False, failure_limit=2))
    monkeypatch.setattr(AccuracyObjective, "measure", nan_metric)
    assert main(["search", str(config)]) == 1
    trials = load(runs_root, name).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == (
        "TrialError: objective accuracy is nan (not a finite number)"
    )
    assert main(["search", str(config)]) == 1, "resuming a study at its failure limit"
    assert len(load(runs_root, name).get_trials()) == 2, "failed trials are not retried"


def test_halving_stops_trials_and_keeps_their_rung(tmp_path, runs_root, monkeypatch):
    from compsearch.search import trial as trial_module

    snapshots = []
    real_snapshot = trial_module.deploy_snapshot

    def counted(*args, **kwargs):
        snapshots.append(1)
        return real_snapshot(*args, **kwargs)

    monkeypatch.setattr(trial_module, "deploy_snapshot", counted)
    name = f"h-{uuid.uuid4().hex[:6]}"
    data = tiny(name, trials=6, finetune_steps=9, baselines=False,
                halving={"enabled": True, "eta": 3, "min_steps": 3})  # fmt: skip
    config = write(tmp_path, data)
    assert main(["search", str(config)]) == 0
    trials = load(runs_root, name).get_trials()
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    assert stopped, "with eta 3, some of 6 trials stop early"
    assert len(snapshots) == sum(1 for t in trials if "rung_0" in t.user_attrs), (
        "every rung is judged on the deploy form"
    )
    for trial in stopped:
        assert "rung_0" in trial.user_attrs and trial.user_attrs["steps"] in (3, 9)
        assert "measured" in trial.user_attrs
    front = load_results(load(runs_root, name)).front()
    assert all(row.state == "COMPLETE" for row in front)
    assert main(["search", str(config)]) == 0
    again = load(runs_root, name).get_trials()
    assert [(t.number, t.state) for t in again] == [(t.number, t.state) for t in trials], (
        "resuming re-runs no stopped trial"
    )


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _states(runs_root: Path, name: str) -> list[TrialState]:
    try:
        return [t.state for t in load(runs_root, name).get_trials()]
    except Exception:
        return []


def _training(runs_root: Path, name: str) -> bool:
    """Two trials complete and a third past its last suggestion (all its parameters stored)."""
    try:
        trials = load(runs_root, name).get_trials()
    except Exception:
        return False
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return len(done) >= 2 and any(len(t.params) == len(done[0].params) for t in running)


def test_killed_search_resumes_and_keeps_completed_trials(tmp_path, runs_root):
    name = f"k-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path, tiny(name, trials=5, finetune_steps=150, baselines=False))
    process = spawn("search", str(config))
    try:
        # killed while training, not between two suggestions (a retry samples what was never drawn)
        _wait(lambda: _training(runs_root, name), 240, "a trial to be training")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    before = {t.number: (t.values, t.params) for t in load(runs_root, name).get_trials()
              if t.state == TrialState.COMPLETE}  # fmt: skip
    killed = [t.number for t in load(runs_root, name).get_trials() if t.state == TrialState.RUNNING]
    assert killed
    resumed = spawn("search", str(config))
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    trials = load(runs_root, name).get_trials()
    assert budget_count(load(runs_root, name)) == (5, 0)
    for number, (values, params) in before.items():
        assert trials[number].state == TrialState.COMPLETE
        assert (trials[number].values, trials[number].params) == (values, params)
    dead = trials[killed[0]]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"] == "its worker died"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].params == dead.params
    assert retry[0].state == TrialState.COMPLETE


def _run_workers(tmp_path, runs_root, name, storage, workers, trials=6, steps=30):
    config = write(tmp_path, tiny(name, trials=trials, storage=storage, finetune_steps=steps))
    first = spawn("search", str(config))
    processes = [first]
    try:
        _wait(lambda: (runs_root / name / "config.yaml").exists() and _states(runs_root, name),
              240, "the study to exist")  # fmt: skip
        processes += [spawn("worker", str(runs_root / name)) for _ in range(workers - 1)]
        outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    return load(runs_root, name)


def test_two_workers_on_a_journal_file_run_exactly_the_requested_trials(tmp_path, runs_root):
    # trials long enough (a few seconds each) that the second worker joins before the first is done
    study = _run_workers(tmp_path, runs_root, f"j-{uuid.uuid4().hex[:6]}", "journal", 2, steps=300)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(trials) == 6 and sorted(numbers) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, "both workers ran trials of the one study"


POSTGRES = os.environ.get("COMPSEARCH_TEST_POSTGRES_URL")


@pytest.mark.skipif(
    not POSTGRES, reason="set COMPSEARCH_TEST_POSTGRES_URL to test PostgreSQL storage"
)
def test_three_workers_on_postgresql_run_exactly_the_requested_trials(tmp_path, runs_root):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    try:
        study = _run_workers(tmp_path, runs_root, name, POSTGRES, 3, trials=7)
        trials = study.get_trials()
        assert len(trials) == 7 and sorted(t.number for t in trials) == list(range(7))
        assert all(t.state == TrialState.COMPLETE for t in trials)
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES)


def test_diverse_export_starts_from_the_most_accurate_wherever_accuracy_is_listed():
    from compsearch.search.results import StudyResults, TrialRow
    from compsearch.search.select import diverse

    teacher = {"accuracy": 1.0, "latency_ms": 10.0}
    measured = [(0.99, 9.0), (0.95, 5.0), (0.90, 2.0)]  # the most accurate is the slowest
    rows = [TrialRow(i, "COMPLETE", {}, {"accuracy": a, "latency_ms": ms}, 0.0, {})
            for i, (a, ms) in enumerate(measured)]  # fmt: skip
    for objectives in (["accuracy", "latency_ms"], ["latency_ms", "accuracy"]):
        results = StudyResults(objectives, "accuracy", "maximize", teacher, rows)
        assert diverse(results, 1)[0].number == 0, objectives
    with pytest.raises(ConfigError, match="--diverse: expected a count of at least 1"):
        diverse(results, -1)


def test_a_study_from_python_is_the_same_as_from_the_cli(runs_root):
    import compsearch

    name = f"py-{uuid.uuid4().hex[:6]}"
    results = compsearch.search(tiny(name, trials=2, finetune_steps=2))
    assert [r.state for r in results.rows] == ["COMPLETE", "COMPLETE"]
    assert (runs_root / name / "config.yaml").exists()
    again = compsearch.search(tiny(name, trials=2, finetune_steps=2))
    assert [r.number for r in again.rows] == [0, 1], "resuming a finished study runs nothing"
    with pytest.raises(ConfigError, match="space.w_bits"):
        compsearch.search({**tiny(name, trials=2), "space": {"w_bits": [2]}})


# -- a latency table's predictions and the front ---------------------------------------------------


class _Confirming:
    """A latency objective whose end-to-end measurement is 20 % over the table's prediction."""

    name = "latency_ms"

    def __init__(self) -> None:
        self.calls = 0

    def confirm(self, model, task, predicted: float) -> dict:
        self.calls += 1
        return {"latency_ms": 1.2 * predicted, "latency_source": "measured"}


def _predicted_trial(violation: float = 0.0):
    objective = _Confirming()
    ctx = types.SimpleNamespace(objectives={"latency_ms": objective}, task=None,
                                violations=lambda measured: {"accuracy_drop": violation},
                                point=lambda m: (m["drop"], m["latency_ms"]))  # fmt: skip
    measured = {"drop": 0.01, "latency_ms": 10.0, "latency_source": "predicted",
                "latency_table_error": 0.05}  # fmt: skip
    return ctx, objective, measured


@pytest.mark.parametrize(
    ("others", "violation", "confirmed"),
    [([{"drop": 0.02, "latency_ms": 9.0}], 0.0, True),  # beside the front: measured
     ([{"drop": 0.0, "latency_ms": 12.0}], 0.0, True),
     ([], 0.0, True),
     ([{"drop": 0.005, "latency_ms": 9.0}], 0.0, False),  # dominated: the prediction ranks it
     ([{"drop": 0.01, "latency_ms": 10.0}], 0.0, True),  # equal to a front point: not dominated
     ([], 0.5, False)],  # over a bound: not on the feasible front
)  # fmt: skip
def test_a_predicted_latency_is_measured_where_it_would_join_the_front(others, violation,
                                                                        confirmed):  # fmt: skip
    ctx, objective, measured = _predicted_trial(violation)
    _confirm_latency(ctx, measured, None, lambda: others)
    assert objective.calls == confirmed
    assert (measured["latency_source"] == "measured") == confirmed
    assert ("latency_table_error" in measured) != confirmed
    assert measured["latency_ms"] == (12.0 if confirmed else 10.0)


def test_a_table_mode_search_keeps_measurements_on_its_front(tmp_path, runs_root, monkeypatch):
    from compsearch.objectives.lut import LatencyTable

    # a loaded machine can make the table's checks miss by more than any bound, and then every
    # trial is measured (tests/test_spaces_objectives.py); here the predictions must stand
    monkeypatch.setattr(LatencyTable, "trusted", lambda self, errors: True)
    data = tiny("table_front", trials=6)
    data["latency"] = {**data["latency"], "mode": "table", "check_first": 1, "check_every": 1000}
    assert main(["search", str(write(tmp_path, data))]) == 0
    trials = [t for t in load(runs_root, "table_front").get_trials() if t.values]
    assert all("latency_predicted_ms" in t.user_attrs["measured"] for t in trials[1:])
    # the front as compsearch reads it (a trial timed beside the teacher counts by its paired
    # speedup, not by its raw milliseconds, which the machine's load moves)
    front = load_results(load(runs_root, "table_front")).front()
    assert any(r.number > 0 for r in front), "a predicted trial joined the front"
    assert all(r.measured["latency_source"] == "measured" for r in front)
    confirmed = [t.user_attrs["measured"] for t in trials[1:]
                 if t.user_attrs["measured"].get("latency_confirmed")]  # fmt: skip
    assert confirmed and all("latency_check_error" in m for m in confirmed)
    checked = trials[0].user_attrs["measured"]  # the table's check: timed beside the teacher too
    assert all(m["teacher_latency_ms"] > 0 for m in [checked, *confirmed])
    assert checked["latency_runs"] == 3 and "latency_check_error" in checked
