"""Reliability, tried as an operator would, against the real CLI in subprocesses:

1. Kill points: a search (digits, 6 trials of 600 steps) is SIGKILLed at 20, 40, 60 and 80 % of the
   run time an uninterrupted search took, and a final run (1,500 steps) twice at half of its run
   time; then each is rerun until done. Survived = the study ends with exactly the requested
   trials, every trial completed before a kill keeps its values, no temporary file is left (a
   killed trial's retry resumes from its checkpoint), and the final artifact is bit-identical to
   one trained without interruption.
2. Concurrent workers per storage (SQLite file, journal file, PostgreSQL, Redis journal): one
   `search` and more `worker` processes on one study; exact = requested trials, numbers 0..n-1.
3. Bad inputs: configs and commands a user gets wrong. Clean = exit code 2, one line on stderr,
   no traceback, and the study already stored byte-identical afterwards.

PostgreSQL and Redis rows need COMPSEARCH_TEST_POSTGRES_URL / COMPSEARCH_TEST_REDIS_URL (as the
test suite); without them those rows say "not run".
Run: python benchmarks/reliability.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml
from _common import header, table

PY = [sys.executable, "-m", "compsearch"]


def config(name: str, **search) -> dict:
    return {
        "study": name, "task": "digits", "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 3, "warmup": 1}, "constraints": {"accuracy_drop": "50%"},
        "space": {"w_bits": [4, 8, 16], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25},
                  "calibration_batches": 1},
        "search": {"sampler": "random", "trials": 6, "finetune_steps": 600, "cache_batches": 4,
                   **search},
        "final": {"steps": 1500, "checkpoint_every": 100},
    }  # fmt: skip


def write(folder: Path, data: dict) -> Path:
    path = folder / f"{data['study']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout)


def study_of(runs: Path, name: str):
    from compsearch.search import StudyFolder
    from compsearch.search.study import open_study

    folder = StudyFolder(runs / name)
    return open_study(folder.frozen(), folder)


def killed_after(args: list[str], seconds: float) -> None:
    process = subprocess.Popen([*PY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(60)


def kill_points(work: Path, runs: Path) -> list[list[object]]:
    """Kill points spread over the run time, measured on an uninterrupted run first."""
    rows = []
    started = time.monotonic()
    cli("search", str(write(work, config("kill-reference"))))
    total = time.monotonic() - started
    for index, share in enumerate((0.2, 0.4, 0.6, 0.8)):
        name = f"kill-search-{index}"
        path = write(work, config(name))
        killed_after(["search", str(path)], share * total)
        before, running = {}, 0
        if (runs / name / "config.yaml").exists():
            trials = study_of(runs, name).get_trials()
            before = {t.number: t.values for t in trials if t.state.name == "COMPLETE"}
            running = sum(t.state.name == "RUNNING" for t in trials)
        done = cli("search", str(path))
        trials = study_of(runs, name).get_trials()
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        kept = all(trials[n].values == v for n, v in before.items())
        leftovers = list((runs / name).rglob(".*.tmp"))
        resumed = [
            t.user_attrs.get("resumed_from_step", 0) for t in trials if "retry_of" in t.user_attrs
        ]
        survived = done.returncode == 0 and len(complete) == 6 and kept and not leftovers
        rows.append([f"search killed at {share:.0%} of its run time ({share * total:.0f} s)",
                     f"{len(before)} complete, {running} mid-trial",
                     f"{len(complete)}/6 complete, values kept: {kept}, temporaries: "
                     f"{len(leftovers)}, retried trials resumed from steps {resumed or '-'}",
                     "survived" if survived else "FAILED"])  # fmt: skip
    # a final run, killed twice, resumed, against one that ran straight through
    name = "kill-final"
    path = write(work, config(name, trials=2))
    cli("search", str(path))
    cli("export", str(runs / name), "--best", "accuracy", "--name", "pick")
    recipe = runs / name / "recipes" / "pick.yaml"
    started = time.monotonic()
    cli("train", str(recipe), "--name", "straight")
    total = time.monotonic() - started
    for share in (0.5, 0.5):
        killed_after(["train", str(recipe), "--name", "resumed", "--resume"], share * total)
    resumed = cli("train", str(recipe), "--name", "resumed", "--resume")
    final = runs / name / "final"
    same = resumed.returncode == 0 and _digest(final / "straight" / "model.safetensors") == _digest(
        final / "resumed" / "model.safetensors"
    )
    rows.append([f"final run killed twice, each at half its run time ({0.5 * total:.0f} s)",
                 "resumed with --resume",
                 f"artifact bit-identical to an uninterrupted run: {same}",
                 "survived" if same else "FAILED"])  # fmt: skip
    return rows


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def workers(work: Path, runs: Path) -> list[list[object]]:
    rows = []
    storages = [("SQLite file (default)", None, 2), ("journal file", "journal", 2),
                ("PostgreSQL", os.environ.get("COMPSEARCH_TEST_POSTGRES_URL"), 3),
                ("Redis journal", os.environ.get("COMPSEARCH_TEST_REDIS_URL"), 2)]  # fmt: skip
    for label, storage, count in storages:
        if label in ("PostgreSQL", "Redis journal") and not storage:
            rows.append([label, count, "-", "not run (no server URL set)"])
            continue
        name = f"workers-{uuid.uuid4().hex[:6]}"
        data = config(name, trials=8, finetune_steps=300)
        if storage:
            data["search"]["storage"] = storage
        path = write(work, data)
        first = subprocess.Popen([*PY, "search", str(path)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (runs / name / "config.yaml").exists():
            time.sleep(0.2)
        others = [subprocess.Popen([*PY, "worker", str(runs / name)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for _ in range(count - 1)]  # fmt: skip
        codes = [p.wait(900) for p in [first, *others]]
        trials = study_of(runs, name).get_trials()
        numbers = sorted(t.number for t in trials)
        ran_by = len({t.user_attrs.get("worker") for t in trials})
        exact = numbers == list(range(8)) and all(t.state.name == "COMPLETE" for t in trials)
        rows.append([label, count, f"{len(trials)} of 8 requested, run by {ran_by} workers",
                     "exact" if exact and not any(codes) else "NOT exact"])  # fmt: skip
        if storage and storage.startswith(("postgresql", "redis")):
            import optuna

            from compsearch.search.storage import open_storage

            optuna.delete_study(study_name=name, storage=open_storage(storage, runs / name))
    return rows


def bad_inputs(work: Path, runs: Path) -> list[list[object]]:
    base = config("bad-inputs", trials=2, finetune_steps=2)
    path = write(work, base)
    cli("search", str(path))
    db = runs / "bad-inputs" / "study.db"
    cases: list[tuple[str, list[str]]] = []

    def variant(label: str, change: dict) -> None:
        data = yaml.safe_load(yaml.safe_dump(base))
        for key, value in change.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        changed = work / f"variant-{len(cases)}.yaml"  # the same study, another file
        changed.write_text(yaml.safe_dump(data))
        cases.append((label, ["search", str(changed)]))

    variant("changed space on resume", {"space": {"w_bits": [2, 8]}})
    variant("typo in a key", {"search": {"trails": 3}})
    variant("trials as text", {"search": {"trials": "ten"}})
    variant("unknown sampler", {"search": {"sampler": "cmaes"}})
    variant("unknown objective", {"objectives": ["accuracy", "speed"]})
    variant("bad constraint", {"constraints": {"latency_ms": "fast"}})
    variant("keep ratio above 1", {"space": {"keep_ratio": 1.5}})
    variant("in-memory SQLite", {"search": {"storage": "sqlite://"}})
    variant("unreachable PostgreSQL", {"study": "bad-storage",
                                       "search": {"storage": "postgresql://x@127.0.0.1:1/none"}})  # fmt: skip
    broken = work / "broken.yaml"
    broken.write_text("study: x\ntask: digits\nsearch: {trials: 3\n")
    bad_recipe = work / "bad-recipe.yaml"
    bad_recipe.write_text("version: 1\nlayers:\n  fc1: {w_bits: 7.5}\n")
    cases += [
        ("YAML that does not parse", ["search", str(broken)]),
        ("missing config file", ["search", str(work / "nope.yaml")]),
        ("--trials 0", ["search", str(path), "--trials", "0"]),
        ("unknown task", ["search", str(write(work, {**base, "study": "t", "task": "mnsit"}))]),
        ("recipe with w_bits 7.5", ["recipe", "check", str(bad_recipe)]),
        ("train --top-k 0", ["train", "--from-study", str(runs / "bad-inputs"), "--top-k", "0"]),
        ("train --checkpoint-every 0", ["train", str(bad_recipe), "--checkpoint-every", "0"]),
        ("evaluate a missing artifact", ["evaluate", str(work / "none")]),
        ("export --diverse -1", ["export", str(runs / "bad-inputs"), "--diverse", "-1"]),
        ("status of a missing study", ["status", str(runs / "nothing")]),
        ("worker on a missing study", ["worker", str(runs / "nothing")]),
    ]
    if not _has_cuda():
        cases.append(("evaluate --device cuda without CUDA",
                      ["evaluate", str(work / "none"), "--device", "cuda"]))  # fmt: skip
    rows = []
    for label, args in cases:
        before = _digest(db)
        result = cli(*args, timeout=300)
        lines = result.stderr.strip().splitlines()
        clean = (result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
                 and _digest(db) == before)  # fmt: skip
        rows.append([label, f"exit {result.returncode}", (lines[-1] if lines else "")[:110],
                     "clean" if clean else "NOT clean"])  # fmt: skip
    return rows


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        runs = work / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        teachers = Path(os.environ.get("COMPSEARCH_RUNS", "runs")) / "_teachers"
        if teachers.exists() and not (runs / "_teachers").exists():
            (runs / "_teachers").symlink_to(teachers.resolve())
        os.environ["COMPSEARCH_RUNS"] = str(runs)
        kills, pools, inputs = kill_points(work, runs), workers(work, runs), bad_inputs(work, runs)
    header("Reliability: kill points, concurrent workers, bad inputs (real CLI, subprocesses)")
    table(["kill point", "state at the kill", "after rerunning", "result"], kills)
    table(["storage", "processes", "trials", "result"], pools)
    table(["bad input", "exit", "the message (first 110 characters)", "result"], inputs)
    survived = sum(r[-1] == "survived" for r in kills)
    exact = sum(r[-1] == "exact" for r in pools)
    clean = sum(r[-1] == "clean" for r in inputs)
    print(f"Kill points survived: {survived}/{len(kills)}. Storages exact: {exact}/"
          f"{sum(r[-1] != 'not run (no server URL set)' for r in pools)}. Bad inputs clean: "
          f"{clean}/{len(inputs)}.")  # fmt: skip


if __name__ == "__main__":
    main()
