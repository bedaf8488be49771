"""Search quality: the surrogate search against random search at 4x the trials, the previous
default, the one-shot ILP recipes and halving — paired over seeds, on the test split.

Per task and seed (the seed is the pair), interleaved so machine noise falls on every variant:

* **surrogate search** (the new default): uniform baselines and one-shot ILP plans first, then the
  surrogate sampler; candidates over a hard latency or size bound are screened, not trained;
* **surrogate search, N trained trials**: the same, run until N trials are trained (the goal's
  terms: screened candidates train nothing), by the fine-tune step budget;
* **previous default**: the config's earlier sampler (NSGA-II on mnist, TPE on minilm) with the
  baselines, every candidate trained;
* **random search** at N and at 4N trials, every candidate trained (the "by hand" baseline);
* **ILP plans alone**: the one-shot recipes inside the surrogate study (same fine-tune);
* **surrogate + halving** at the same fine-tune step budget (mnist);
* **bits only** on mnist (a region the latency bound rules out), to price screening: where the
  pre-flight check finds the space's cheapest points over a bound, the study is refused before
  any trial, and that refusal's seconds are the region's whole cost.

Hypervolume is of the feasible front chosen on the validation split (normalized objectives, fixed
reference point; see compsearch.search.pareto); the *test* figure re-evaluates those trials' saved
artifacts on the test split. Differences are paired by seed: median, a bootstrap 90 % interval of
the median difference, and a one-sided Wilcoxon signed-rank p. The x axis of the plots is trained-
trial equivalents (fine-tune steps spent / steps per trial): a screened trial costs no training.

Every search is a study under ``--root`` (default ``runs/_benchmarks/search_quality``): rerunning
the script resumes unfinished studies and reuses finished ones (test accuracies are cached per
study), so the tables can be completed over several sittings; ``--seeds`` says how many are in, and
``--first-seed`` runs only the later ones when the earlier studies live elsewhere (their per-seed
values are then combined by hand, pairs intact).
``--only surrogate random`` runs those variants alone (a change to the surrogate sampler,
compared with random search on the same seeds: move its studies aside and keep the others).
Run: python benchmarks/search_quality.py [--tasks mnist minilm] [--seeds 5] [--first-seed 0]
[--only surrogate trained previous random halving bits]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch
import yaml
from _common import header, table

from compsearch.errors import ConfigError
from compsearch.search import folder_for, load_driver, load_results, parse_config
from compsearch.search.pareto import hypervolume, non_dominated, reference_point
from compsearch.search.study import open_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {  # per task: N (trials of the compared searches), fine-tune steps, space changes
    "mnist": {"trials": 16, "steps": 100, "space": {"grouping": "per_layer"}},
    "minilm": {"trials": 8, "steps": 10, "space": {}},
}
SURROGATE, PREVIOUS, RANDOM, RANDOM4 = ("surrogate search", "previous default", "random search",
                                        "random search, 4x trials")  # fmt: skip
HALVING, BITS = "surrogate + halving, same steps", "bits only, surrogate + screening"
PLANS = "ILP plans alone (same fine-tune)"
TRAINED = "surrogate search, N trained trials"
#: the sampler each task's config used before the surrogate search (both configs use it now)
PREVIOUS_SAMPLER = {"mnist": "nsga2", "minilm": "tpe"}
SLACK = {"latency_ms": 0.05, "size_bytes": 0.001}  # noise / provenance-bytes tolerance
SHORT = {"surrogate": SURROGATE, "trained": TRAINED, "previous": PREVIOUS, "random": RANDOM4,
         "halving": HALVING, "bits": BITS}  # --only's names  # fmt: skip


def variants(raw: dict, task: str, trials: int, steps: int) -> dict[str, dict]:
    new = {"sampler": "surrogate", "baselines": True, "plans": 4, "screen": True}
    out = {
        SURROGATE: {"search": new},
        PREVIOUS: {"search": {"sampler": PREVIOUS_SAMPLER[task], "baselines": True,
                              "plans": 0, "screen": False}},
        RANDOM4: {"search": {"sampler": "random", "baselines": False, "plans": 0,
                             "screen": False, "trials": 4 * trials}},
        # the goal's own terms: N *trained* trials (a screened one trains nothing), by the
        # product's fine-tune step budget; the trial cap only bounds a run of screened ones
        TRAINED: {"search": {**new, "trials": 4 * trials, "step_budget": trials * steps}},
    }  # fmt: skip
    if task == "mnist":
        out[HALVING] = {"search": {**new, "trials": 4 * trials, "step_budget": trials * steps,
                                   "halving": {"enabled": True, "eta": 3}}}  # fmt: skip
        out[BITS] = {"search": new, "space": {"keep_ratio": 1.0, "depth": False}}
    return out


def merged(raw: dict, change: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in change.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


class StudyRun:
    """One finished study: its results, trials in order, and test accuracies of chosen trials."""

    def __init__(self, raw: dict, root: Path) -> None:
        self.config = parse_config(raw)
        self.folder = folder_for(self.config, root)
        load_driver("optuna")(self.config, self.folder).run()
        self.study = open_study(self.config, self.folder)
        self.results = load_results(self.study)
        self.trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        self._test_path = self.folder.path / "test_accuracy.json"
        self._test = json.loads(self._test_path.read_text()) if self._test_path.exists() else {}

    def rows(self, first: int | None = None, where=lambda row: True):
        return [r for r in self.results.rows if (first is None or r.number < first) and where(r)]

    def front(self, rows) -> list:
        done = [r for r in rows if r.state == "COMPLETE" and r.feasible]
        points = [self.results.point(r) for r in done]
        return [done[i] for i in non_dominated(points)]

    def volume(self, rows, split: str = "validation") -> float:
        front = self.front(rows)
        points = [self._point(r, split) for r in front]
        return hypervolume(points, reference_point(self.results.objectives))

    def _point(self, row, split: str) -> tuple[float, ...]:
        if split == "validation":
            return self.results.point(row)
        measured = {**row.measured, self.results.metric: self.test_metric(row.number)}
        return self.results.point(type(row)(**{**row.__dict__, "measured": measured}))

    def test_metric(self, number: int) -> float:
        key = str(number)
        if key not in self._test:
            from compsearch.paths import runs_root
            from compsearch.pipeline import rebuild
            from compsearch.tasks import get_task

            task = get_task(self.config.task, runs_root=runs_root())
            path = self.folder.path / "trials" / f"{number:05d}" / "model.safetensors"
            deployed, _, _ = rebuild(task, path)
            self._test[key] = task.evaluate(deployed, split="test")[task.primary_metric]
            self._test_path.write_text(json.dumps(self._test, indent=1))
        return self._test[key]

    def trained(self, rows) -> float:
        """Trained-trial equivalents: fine-tune steps spent / steps per trial."""
        steps = max(1, self.config.search.finetune_steps)
        return sum(self.trials[r.number].user_attrs.get("steps", 0) for r in rows) / steps

    def curve(self) -> list[tuple[float, float]]:
        return [(self.trained(self.rows(n + 1)), self.volume(self.rows(n + 1)))
                for n in range(len(self.results.rows))]  # fmt: skip


def paired(a: list[float], b: list[float]) -> str:
    """Median of the paired differences a − b, bootstrap 90 % interval, one-sided Wilcoxon p."""
    from scipy.stats import wilcoxon

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(0)
    boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    low, high = boots[int(0.05 * len(boots))], boots[int(0.95 * len(boots)) - 1]
    try:
        p = wilcoxon(diffs, alternative="greater").pvalue if any(diffs) else 1.0
    except ValueError:
        p = float("nan")
    wins = sum(d > 0 for d in diffs)
    return (f"{statistics.median(diffs):+.4f} [{low:+.4f}, {high:+.4f}], "
            f"wins {wins}/{len(diffs)}, p={p:.3f}")  # fmt: skip


def evaluate_task(task: str, seeds: range, root: Path, plots: Path,
                  wanted: set[str]) -> tuple[list, list, list]:  # fmt: skip
    raw = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    setting = SETTINGS[task]
    trials, steps = setting["trials"], setting["steps"]
    raw["space"] = {**raw["space"], **setting["space"]}
    raw["search"].update({"trials": trials, "finetune_steps": steps, "save_models": True,
                          "halving": {"enabled": False}})  # fmt: skip
    runs: dict[str, list[StudyRun]] = {}
    refused: dict[str, list[tuple[float, str]]] = {}  # a study the pre-flight check turned down
    for seed in seeds:  # interleaved: every variant of a seed before the next seed
        for label, change in variants(raw, task, trials, steps).items():
            if label not in wanted:
                continue
            config = merged(raw, change)
            config["study"] = f"{task}-{re.sub(r'[^A-Za-z0-9]+', '-', label)}-{seed}"
            config["search"] = {**config["search"], "seed": seed}
            started = time.monotonic()
            try:
                run = StudyRun(config, root)
            except ConfigError as error:  # an unreachable bound: refused before any trial
                refused.setdefault(label, []).append((time.monotonic() - started, str(error)))
            else:
                runs.setdefault(label, []).append(run)
    if set(refused) & set(runs):
        raise SystemExit(f"{sorted(set(refused) & set(runs))}: refused in some seeds only, so "
                         "the seeds no longer pair; compare those studies by hand")  # fmt: skip
    hv: dict[str, dict[str, list[float]]] = {}
    for split in ("validation", "test"):
        for label, studies in runs.items():
            if label == RANDOM4:
                hv.setdefault(RANDOM, {})[split] = [s.volume(s.rows(trials), split)
                                                    for s in studies]  # fmt: skip
            hv.setdefault(label, {})[split] = [s.volume(s.rows(), split) for s in studies]
        for label, seconds in refused.items():
            hv.setdefault(label, {})[split] = [0.0] * len(seconds)
        hv.setdefault(PLANS, {})[split] = [
            s.volume(s.rows(where=lambda r, s=s: "plan" in s.trials[r.number].user_attrs), split)
            for s in runs[SURROGATE]
        ]
    rows = []
    for label in [SURROGATE, TRAINED, PREVIOUS, RANDOM, RANDOM4, PLANS, HALVING, BITS]:
        if label not in hv:
            continue
        studies = runs.get(label, runs[SURROGATE] if label == PLANS else runs[RANDOM4])
        trained = [s.trained(s.rows(trials) if label == RANDOM else
                             s.rows(where=lambda r, s=s: "plan" in s.trials[r.number].user_attrs)
                             if label == PLANS else s.rows()) for s in studies]  # fmt: skip
        if label in refused:  # nothing was trained
            trained = [0.0] * len(refused[label])
        for split in ("validation", "test"):
            values = hv[label][split]
            rows.append([task, label, split, " / ".join(f"{v:.3f}" for v in values),
                         f"{statistics.median(values):.4f}", f"{max(values) - min(values):.4f}",
                         f"{statistics.median(trained):.1f}"])  # fmt: skip
    comparisons = []
    pairs = [(SURROGATE, other) for other in (RANDOM4, RANDOM, PREVIOUS, PLANS, HALVING)]
    for first, other in [*pairs, (TRAINED, RANDOM4), (TRAINED, RANDOM)]:
        if first in hv and other in hv:
            for split in ("validation", "test"):
                comparisons.append([task, f"{first} − {other}", split,
                                    paired(hv[first][split], hv[other][split])])  # fmt: skip
    _plot(task, runs, plots / f"hypervolume_vs_trials_{task}.png", trials)
    extra = _screening(task, runs) + _refusals(task, runs, refused, trials)
    return rows, comparisons, extra + _plans(task, runs[SURROGATE])


def _seconds(studies: list[StudyRun]) -> tuple[list[float], list[float]]:
    """Wall seconds of the screened and of the trained trials of ``studies``."""
    screened, trained = [], []
    for run in studies:
        for row in run.rows(where=lambda r: r.state == "COMPLETE"):
            path = run.folder.path / "trials" / f"{row.number:05d}" / "metrics.json"
            seconds = json.loads(path.read_text())["seconds"]
            (screened if row.screened else trained).append(seconds)
    return screened, trained


def _screening(task: str, runs: dict[str, list[StudyRun]]) -> list:
    """What screened trials cost against trained ones; a region where nothing was trained is
    priced against the trained trials of the surrogate search on the same task."""
    out = []
    for label in (SURROGATE, BITS):
        if label not in runs:
            continue
        screened, trained = _seconds(runs[label])
        count = len(trained)
        if not trained:
            trained = _seconds(runs[SURROGATE])[1]
        if not screened or not trained:
            out.append([task, label, len(screened), count, "-", "-"])
            continue
        ratio = statistics.median(screened) / statistics.median(trained)
        region = len(screened) * statistics.median(screened)
        if_trained = len(screened) * statistics.median(trained)
        out.append([task, label, len(screened), count, f"{ratio * 100:.1f} %",
                    f"{region:.0f} s instead of {if_trained:.0f} s ({region / if_trained * 100:.1f} %)"])  # fmt: skip
    return out


def _refusals(task: str, runs: dict[str, list[StudyRun]],
              refused: dict[str, list[tuple[float, str]]], trials: int) -> list:  # fmt: skip
    """A study the pre-flight check refused (no recipe of its space can meet a bound): its whole
    cost — opening it, measuring the space's cheapest points — against training its ``trials``
    at the surrogate search's median trained-trial time."""
    out = []
    trained = _seconds(runs[SURROGATE])[1]
    for label, seen in refused.items():
        seconds = statistics.median(s for s, _ in seen)
        if_trained = trials * statistics.median(trained)
        out.append([task, label, f"refused in {len(seen)}/{len(seen)} seeds", 0, "-",
                    f"{seconds:.1f} s instead of {if_trained:.0f} s "
                    f"({seconds / if_trained * 100:.1f} %): {seen[0][1].split(' — ')[0]}"])  # fmt: skip
    return out


def _plans(task: str, studies: list[StudyRun]) -> list:
    matched = total = 0
    for run in studies:
        plans = run.rows(where=lambda r, run=run: "plan" in run.trials[r.number].user_attrs
                         and r.state == "COMPLETE" and r.feasible)  # fmt: skip
        others = run.front(run.rows(where=lambda r, run=run: "plan" not in
                                    run.trials[r.number].user_attrs))  # fmt: skip
        for plan in plans:
            total += 1
            point = run.results.point(plan)
            slack = [SLACK.get(o, 0.0) * v for o, v in zip(run.results.objectives, point,
                                                          strict=True)]  # fmt: skip
            matched += any(all(a <= b + e for a, b, e in
                               zip(run.results.point(o), point, slack, strict=True))
                           for o in others)  # fmt: skip
    return [[task, PLANS, "-", "-", "-", f"{matched}/{total} feasible plan points matched or "
             "dominated by a front point the search found itself"]]  # fmt: skip


def _plot(task: str, runs: dict[str, list[StudyRun]], path: Path, trials: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for label, studies in runs.items():
        curves = [s.curve() for s in studies]
        grid = [x / 2 for x in range(0, 2 * int(max(c[-1][0] for c in curves)) + 1)]

        def at(curve, x):
            values = [v for t, v in curve if t <= x + 1e-9]
            return values[-1] if values else 0.0

        series = [[at(c, x) for x in grid] for c in curves]
        median = [statistics.median(column) for column in zip(*series, strict=True)]
        low = [min(column) for column in zip(*series, strict=True)]
        high = [max(column) for column in zip(*series, strict=True)]
        (line,) = axes.plot(grid, median, label=label)
        axes.fill_between(grid, low, high, color=line.get_color(), alpha=0.15)
    axes.axvline(trials, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("trained-trial equivalents (fine-tune steps / steps per trial)")
    axes.set_ylabel("hypervolume, feasible front (validation)")
    axes.set_title(f"{task}: median over seeds, shaded min–max")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["mnist", "minilm"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first..seeds-1 only (a sitting that adds seeds to a table)")  # fmt: skip
    parser.add_argument("--root", type=Path, default=None,
                        help="where the studies live (default: runs/_benchmarks/search_quality)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=sorted(SHORT), default=sorted(SHORT),
                        help="run these variants only (the surrogate search always runs)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    header("Search quality: surrogate search vs random at 4x, the previous default, ILP plans")
    plots = Path(__file__).resolve().parent
    runs = Path(os.environ.get("COMPSEARCH_RUNS", "runs"))
    root = args.root or runs / "_benchmarks" / "search_quality"
    root.mkdir(parents=True, exist_ok=True)
    for shared in ("_teachers", "_latency", "_sensitivity"):
        if (runs / shared).exists() and not (root / shared).exists():
            (root / shared).symlink_to((runs / shared).resolve())
    os.environ["COMPSEARCH_RUNS"] = str(root)
    rows, comparisons, extra = [], [], []
    for task in args.tasks:
        wanted = {SURROGATE, *(SHORT[name] for name in args.only)}
        r, c, e = evaluate_task(task, range(args.first_seed, args.seeds), root, plots, wanted)
        rows, comparisons, extra = rows + r, comparisons + c, extra + e
    table(["task", "search", "split", "hypervolume per seed", "median", "spread",
           "trained trials (median)"], rows)  # fmt: skip
    table(["task", "paired difference", "split", "median [90 % CI], wins, Wilcoxon p"],
          comparisons)  # fmt: skip
    table(["task", "search", "screened", "trained", "screened / trained time", "screened region"],
          extra)  # fmt: skip
    for task in args.tasks:
        print(f"![hypervolume vs trials, {task}](hypervolume_vs_trials_{task}.png)\n")


if __name__ == "__main__":
    main()
