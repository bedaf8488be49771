"""optuna-dashboard on a compsearch study, in a real headless browser: screenshots of what a user sees.

Runs a small digits study whose size bound some trials break (its trials fine-tune 20 steps; a
second run resumes it), starts ``compsearch dashboard`` on it, and has Chromium (Debian's package,
headless) render the study's pages: the overview (objective names, the Pareto front with feasible
and infeasible trials, best trials), the trial list (a trial's attributes, constraints, intermediate
values; the overview's lower plots include the intermediate values). Screenshots go to ``benchmarks/screenshots/``;
benchmarks/RESULTS.md describes them.

Run: python benchmarks/dashboard_screenshots.py [--port 8765] [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from _common import header

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "screenshots"
PAGES = {  # file name -> (page of the study, window height: the overview's plots run long)
    "dashboard-overview.png": ("", 3000),
    "dashboard-trials.png": ("/trials", 1100),  # the first trial (a screened baseline)
    "dashboard-trial-trained.png": ("/trials?numbers={trained}", 1100),  # a fine-tuned one
}


def study_config(trials: int) -> dict:
    return {
        "study": "dashboard-digits", "task": "digits",
        "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 10, "warmup": 2},
        "constraints": {"accuracy_drop": "3%", "size_bytes": "0.12x"},
        "space": {"w_bits": [2, 4, 8, 16], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25}},
        "search": {"sampler": "nsga2", "trials": trials, "finetune_steps": 20, "cache_batches": 4,
                   "population_size": 4, "plans": 2},
    }  # fmt: skip


def _trials(folder: Path):
    from compsearch.search import StudyFolder
    from compsearch.search.study import open_study

    study_folder = StudyFolder(folder)
    return open_study(study_folder.frozen(), study_folder).get_trials()


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the dashboard did not answer at {url} within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    runs = Path(os.environ.get("COMPSEARCH_RUNS", ROOT / "runs"))
    env = {**os.environ, "COMPSEARCH_RUNS": str(runs)}
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "dashboard-digits.yaml"
        config.write_text(yaml.safe_dump(study_config(args.trials)))
        subprocess.run([sys.executable, "-m", "compsearch", "search", str(config)], check=True,
                       env=env)  # fmt: skip
    folder = runs / "dashboard-digits"
    server = subprocess.Popen([sys.executable, "-m", "compsearch", "dashboard", str(folder),
                               "--port", str(args.port)], env=env)  # fmt: skip
    base = f"http://127.0.0.1:{args.port}/dashboard/studies/1"
    trained = next(t.number for t in _trials(folder) if t.intermediate_values)
    try:
        wait_for(f"http://127.0.0.1:{args.port}/api/studies")
        OUT.mkdir(parents=True, exist_ok=True)
        for name, (page, height) in PAGES.items():
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--window-size=1400,{height}",
                            "--virtual-time-budget=15000", f"--screenshot={OUT / name}",
                            base + page.format(trained=trained)], check=True, capture_output=True, timeout=120)  # fmt: skip
            print(f"{OUT / name}: {(OUT / name).stat().st_size / 1e3:.0f} KB")
    finally:
        server.terminate()
        server.wait(timeout=30)
    header("optuna-dashboard screenshots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
