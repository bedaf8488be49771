"""What a screened trial costs against a trained one, as the fine-tune grows (mnist).

The same 12 candidates (``configs/mnist.yaml``'s space, random sampler, seed 0, no one-shot plans)
are searched at several fine-tune lengths; candidates whose latency or size breaks a bound are
screened — measured, evaluated zero-shot, recorded, not fine-tuned — and the rest are trained. Per
length: the median wall time of a screened trial and of a trained one (each trial's own
``seconds`` in its metrics.json) and their ratio. Each length is a study under the runs root's
``_benchmarks/screening_cost``; rerunning resumes or reuses them.

``--refused K`` prices the other way a region costs little: a "bits only" space (keep ratio 1, no
depth) whose latency bound no recipe reaches is refused by the pre-flight check before any trial.
It opens that study K times (a new name each; nothing is stored) and times each, from the command
to the refusal — task, teacher reference, the space's cheapest points measured.

Run: python benchmarks/screening_cost.py [--steps 100 1000 3000] [--refused 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import yaml
from _common import header, results_folder, table

from compsearch.cli import main as cli

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "mnist.yaml")
TRIALS = 12


def study(steps: int) -> str:
    return f"screening-{steps}"


def run(steps: int, root: Path) -> list[dict]:
    with open(CONFIG) as stream:
        config = yaml.safe_load(stream)
    config["study"] = study(steps)
    config["search"].update({"sampler": "random", "trials": TRIALS, "plans": 0,
                             "finetune_steps": steps, "seed": 0})  # fmt: skip
    path = root / f"{study(steps)}.yaml"
    path.write_text(yaml.safe_dump(config))
    if cli(["search", str(path)]) != 0:
        raise SystemExit(f"the search at {steps} steps failed")
    folder = root / study(steps) / "trials"
    return [json.loads((trial / "metrics.json").read_text())
            for trial in sorted(folder.iterdir()) if (trial / "metrics.json").exists()]  # fmt: skip


def refusal(index: int, root: Path) -> tuple[float, str]:
    """Seconds from the command to the pre-flight check's refusal of a "bits only" study, and the
    refusal's first words."""
    with open(CONFIG) as stream:
        config = yaml.safe_load(stream)
    config["study"] = f"bits-only-{os.getpid()}-{index}"
    config["space"].update({"keep_ratio": 1.0, "depth": False})
    config["search"].update({"trials": 16, "finetune_steps": 100, "seed": index})
    path = root / f"{config['study']}.yaml"
    path.write_text(yaml.safe_dump(config))
    errors = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(errors):
        code = cli(["search", str(path)])
    seconds = time.monotonic() - started
    path.unlink()
    if code != 2 or (root / config["study"]).exists():
        raise SystemExit(f"expected the pre-flight check to refuse {config['study']}: exit {code}")
    line = next(line for line in errors.getvalue().splitlines() if line.startswith("error:"))
    return seconds, line.split(" — ")[0]


def refusals(count: int, root: Path) -> None:
    refusal(-1, root)  # trains or loads the teacher, warms the process: not timed
    rows = [[index, f"{seconds:.2f}", reason] for index in range(count)
            for seconds, reason in [refusal(index, root)]]  # fmt: skip
    seconds = [float(row[1]) for row in rows]
    rows.append(["median", f"{statistics.median(seconds):.2f}", ""])
    header(
        "A refused region: opening a 'bits only' mnist study until the pre-flight check stops it"
    )
    table(["run", "seconds", "refusal"], rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="*", default=[100, 1000, 3000])
    parser.add_argument("--refused", type=int, default=0,
                        help="time this many refusals of a 'bits only' study (see above)")  # fmt: skip
    args = parser.parse_args()
    root = results_folder("screening_cost")
    os.environ["COMPSEARCH_RUNS"] = str(root)  # the studies' runs root, from here on
    if args.refused:
        refusals(args.refused, root)
    rows = []
    for steps in args.steps:
        trials = run(steps, root)
        screened = [t["seconds"] for t in trials if t.get("screened")]
        trained = [t["seconds"] for t in trials if not t.get("screened")]
        if not screened or not trained:
            rows.append([steps, len(screened), len(trained), "—", "—", "—"])
            continue
        ratio = statistics.median(screened) / statistics.median(trained)
        rows.append([steps, len(screened), len(trained), f"{statistics.median(screened):.2f}",
                     f"{statistics.median(trained):.2f}", f"{100 * ratio:.1f} %"])  # fmt: skip
    if not rows:
        return
    header("Screening cost against fine-tune length (mnist)")
    table(["fine-tune steps", "screened", "trained", "screened trial s (median)",
           "trained trial s (median)", "screened / trained"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
