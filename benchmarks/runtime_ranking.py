"""Does the serving runtime change the front? ``minilm`` searched with latency timed in ONNX Runtime.

The study is ``configs/minilm.yaml`` with ``latency: {runtime: onnxruntime, mode: measured}`` and a
smaller budget (``--trials``, ``--steps``). Afterwards every trial's deploy form — its recipe
replayed with no fine-tune: latency depends only on the structure and formats — is also timed in
PyTorch eager, interleaved with the PyTorch teacher. Both speed-ups are ratios to the teacher in the
same runtime. The table lists the trials by their ONNX Runtime speed-up with both ranks, Kendall's
tau between the two orders, and the front (validation accuracy, speed-up, file size) each runtime's
numbers make. Rerunning continues the study and reuses the PyTorch timings already taken
(``<study>/torch_latency.json``).
Run: python benchmarks/runtime_ranking.py [--trials 10] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import yaml
from _common import header, table
from scipy.stats import kendalltau

from compsearch.kernels.deploy import to_deploy
from compsearch.objectives.latency import measure_latency
from compsearch.paths import runs_root
from compsearch.pipeline import compress
from compsearch.recipes import read_recipe
from compsearch.search import folder_for, load_driver, load_results, parse_config
from compsearch.search.pareto import non_dominated
from compsearch.search.study import open_study
from compsearch.tasks import get_task, move

ROOT = Path(__file__).resolve().parents[1]


def config(trials: int, steps: int):
    raw = yaml.safe_load((ROOT / "configs" / "minilm.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["study"] = "minilm-onnxruntime"
    raw["latency"] = {"runtime": "onnxruntime", "mode": "measured", "threads": 2, "warmup": 1,
                      "repeats": 5, "max_repeats": 12, "ci": 0.1}  # fmt: skip
    # no one-shot plans: they need a sensitivity table, an export per variant here
    raw["search"] = {**raw["search"], "trials": trials, "finetune_steps": steps, "plans": 0}
    return parse_config(raw)


def torch_speedups(folder: Path, numbers: list[int], task) -> dict[int, float]:
    """PyTorch eager speed-up over the PyTorch teacher of each trial's deploy form (cached)."""
    path = folder / "torch_latency.json"
    done = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    example = move(task.calibration_batches(1)[0], "cpu")
    teacher, _ = to_deploy(task.teacher(), "cpu", lambda m: task.forward(m, example))
    for number in numbers:
        if number in done:
            continue
        recipe = read_recipe(folder / "trials" / f"{number:05d}" / "recipe.yaml")
        deployed = compress(task, recipe, steps=0).deployed
        result = measure_latency(deployed, task, "cpu", 2, warmup=1, repeats=6, reference=teacher)
        done[number] = 1.0 / result.ratio
        path.write_text(json.dumps(done, indent=1))
        print(f"trial {number}: PyTorch speed-up {done[number]:.2f}×", flush=True)
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = config(args.trials, args.steps)
    folder = folder_for(cfg, runs_root())
    load_driver("optuna")(cfg, folder).run()
    results = load_results(open_study(cfg, folder))
    metric = results.metric
    rows = [r for r in results.rows if "speedup" in r.measured and metric in r.measured]
    task = get_task("minilm", runs_root=runs_root())
    torch_up = torch_speedups(folder.path, [r.number for r in rows], task)
    ort_up = {r.number: r.measured["speedup"] for r in rows}
    numbers = sorted(ort_up, key=lambda n: -ort_up[n])
    torch_rank = {n: i + 1 for i, n in enumerate(sorted(numbers, key=lambda n: -torch_up[n]))}
    tau = kendalltau([ort_up[n] for n in numbers], [torch_up[n] for n in numbers]).statistic

    def front(speedups: dict[int, float]) -> set[int]:
        points = [(-r.measured[metric], -speedups[r.number], r.measured["size_bytes"])
                  for r in rows]  # fmt: skip
        return {rows[i].number for i in non_dominated(points)}

    ort_front, torch_front = front(ort_up), front(torch_up)
    by_number = {r.number: r for r in rows}
    header("Does the runtime change the ranking? minilm, latency in ONNX Runtime vs PyTorch eager")
    print(f"Study: {cfg.study}, {len(rows)} trials with measurements "
          f"({args.steps} fine-tune steps each).\n")  # fmt: skip
    table(["trial", f"{metric} (validation)", "size MB", "speed-up ONNX Runtime (rank)",
           "speed-up PyTorch (rank)", "front: ORT / PyTorch", "state"],
          [[n, f"{by_number[n].measured[metric]:.4f}",
            f"{by_number[n].measured['size_bytes'] / 1e6:.1f}",
            f"{ort_up[n]:.2f}× ({i + 1})", f"{torch_up[n]:.2f}× ({torch_rank[n]})",
            f"{'yes' if n in ort_front else '-'} / {'yes' if n in torch_front else '-'}",
            by_number[n].state.lower() + (", screened" if by_number[n].screened else "")]
           for i, n in enumerate(numbers)])  # fmt: skip
    print(f"Kendall's tau between the two speed-up orders: {tau:.2f}. Front members: ONNX Runtime "
          f"{sorted(ort_front)}, PyTorch {sorted(torch_front)}.")  # fmt: skip


if __name__ == "__main__":
    main()
