"""Does timing a candidate interleaved with its teacher change either model's time?

A trial's latency is timed interleaved with the teacher (teacher, candidate, candidate, teacher, …,
see compsearch.objectives.latency); the final run divides a teacher time measured back to back by
the candidate's interleaved time. If running one model slowed the next (caches, allocator, clock),
the two would disagree. Per random recipe of the default space (untrained; latency does not depend
on trained weights), three ways in turn, twice: each model **alone** (back to back), **interleaved**
(as trials time it), and in **warm pairs** (each timed run preceded by an untimed run of the same
model). Medians in ms, and the candidate / teacher ratio each way gives.

Run: python benchmarks/latency_pairing.py [--tasks mnist minilm] [--recipes 3] [--runs 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch
from _common import header, table

from compsearch.kernels.deploy import to_deploy
from compsearch.pipeline import compress
from compsearch.spaces import Space, discover, parse_space
from compsearch.tasks import get_task, move


def _timer(task, batch):
    def timed(model) -> float:
        started = time.perf_counter()
        task.forward(model, batch)
        return (time.perf_counter() - started) * 1e3

    return timed


def three_ways(timed, teacher, candidate, runs: int) -> dict[str, tuple[float, float, float]]:
    """Per way: (teacher median, candidate median, median of the paired ratios)."""
    alone_t = [timed(teacher) for _ in range(runs)]
    alone_c = [timed(candidate) for _ in range(runs)]
    pairs: dict[str, list[tuple[float, float]]] = {"interleaved": [], "warm pairs": []}
    for way, warm in (("interleaved", False), ("warm pairs", True)):
        for index in range(runs):
            order = (candidate, teacher) if index % 2 else (teacher, candidate)
            times = {}
            for model in order:
                if warm:
                    timed(model)
                times[id(model)] = timed(model)
            pairs[way].append((times[id(teacher)], times[id(candidate)]))
    median = statistics.median
    out = {"alone": (median(alone_t), median(alone_c), median(alone_c) / median(alone_t))}
    for way, values in pairs.items():
        out[way] = (median(t for t, _ in values), median(c for _, c in values),
                    median(c / t for t, c in values))  # fmt: skip
    return out


def evaluate(name: str, recipes: int, runs: int, rounds: int) -> list[list[object]]:
    task = get_task(name)
    teacher = task.teacher()
    example = task.calibration_batches(1)[0]
    shipped, _ = to_deploy(teacher, run=lambda m: task.forward(m, example))
    space = Space.build(parse_space({"depth": True}), discover(task), name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    timed = _timer(task, move(task.example_inputs(), "cpu"))
    rows = []
    with torch.inference_mode():
        for _ in range(3):
            timed(shipped)
        for recipe in range(recipes):
            trial = study.ask()
            candidate = compress(task, space.suggest(trial), steps=0).deployed
            study.tell(trial, 0.0)
            for _ in range(3):
                timed(candidate)
            for round_ in range(rounds):
                ways = three_ways(timed, shipped, candidate, runs)
                rows.append([name, recipe, round_,
                             *(f"{ways[w][0]:.1f}" for w in ways),
                             *(f"{ways[w][1]:.1f}" for w in ways),
                             *(f"{ways[w][2]:.3f}" for w in ways)])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["mnist", "minilm"])
    parser.add_argument("--recipes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header("Latency: the teacher alone, interleaved with a candidate, and in warm pairs")
    rows = [row for name in args.tasks
            for row in evaluate(name, args.recipes, args.runs, args.rounds)]  # fmt: skip
    ways = ("alone", "interleaved", "warm")
    table(["task", "recipe", "round", *(f"teacher ms, {w}" for w in ways),
           *(f"candidate ms, {w}" for w in ways), *(f"ratio, {w}" for w in ways)], rows)  # fmt: skip


if __name__ == "__main__":
    main()
