"""``compsearch status runs/<study>``: counts by state, front size, hypervolume, time."""

from __future__ import annotations

import argparse
from pathlib import Path

from optuna.trial import TrialState

from compsearch.search import StudyFolder, load_results
from compsearch.search.explain import explain
from compsearch.search.study import open_study


def add_parser(commands) -> None:
    parser = commands.add_parser("status", help="where a study stands")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    folder = StudyFolder(Path(args.study))
    config = folder.frozen()
    study = open_study(config, folder)
    results = load_results(study)
    counts = results.counts()
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.datetime_complete is not None and t.datetime_start]
    done = sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))
    print(f"study {config.study} ({config.task}, {config.search.driver}/{config.search.sampler})")
    print("  " + ", ".join(f"{state.lower()} {n}" for state, n in sorted(counts.items())))
    screened = sum(1 for r in results.rows if r.screened)
    if screened:
        print(f"  of those complete, {screened} screened: a latency or size bound broken before "
              "training, so not fine-tuned (zero-shot accuracy)")  # fmt: skip
    front = results.front()
    print(f"  feasible front: {len(front)} trials, hypervolume {results.hypervolume(front):.4f}")
    for line in explain(results, config.constraints):
        print(f"  {line}")
    if finished:
        start = min(t.datetime_start for t in finished)
        end = max(t.datetime_complete for t in finished)
        per_trial = sum((t.duration.total_seconds() for t in finished), 0.0) / len(finished)
        remaining = max(0, config.search.trials - done) * per_trial
        print(f"  elapsed {(end - start).total_seconds():.0f} s; about {remaining:.0f} s of "
              f"trials remain ({per_trial:.1f} s per trial)")  # fmt: skip
    failures = [t for t in trials if t.state == TrialState.FAIL]
    for trial in failures[-5:]:
        print(f"  trial {trial.number} failed: {trial.user_attrs.get('fail_reason', '?')[:160]}")
    return 0
