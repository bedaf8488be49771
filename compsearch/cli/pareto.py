"""``compsearch pareto runs/<study>``: the feasible front as a table, ``pareto.csv`` and ``pareto.png``."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from compsearch._files import write_bytes_atomic, write_text_atomic
from compsearch.search import StudyFolder, load_results
from compsearch.search.results import StudyResults, TrialRow
from compsearch.search.study import open_study


def add_parser(commands) -> None:
    parser = commands.add_parser("pareto", help="show and save a study's Pareto front")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.set_defaults(handler=run)


def _names(results: StudyResults) -> list[str]:
    """The measured key of each objective (accuracy: the task's metric; a plug-in: its name)."""
    return [results.metric if o == "accuracy" else results.keys.get(o, (o,))[0]
            for o in results.objectives]  # fmt: skip


def columns(results: StudyResults) -> list[str]:
    names = _names(results)
    return ["trial", *names, f"{results.metric}_drop", "speedup", "size_ratio", "feasible",
            "latency_source"]  # fmt: skip


def row_values(results: StudyResults, row: TrialRow) -> list[object]:
    names = _names(results)
    m = row.measured
    return [row.number, *[m.get(n) for n in names], m.get(f"{results.metric}_drop"),
            m.get("speedup"), m.get("size_ratio"), row.feasible,
            m.get("latency_source", "measured")]  # fmt: skip


def show_front(folder: StudyFolder) -> StudyResults:
    config = folder.frozen()
    results = load_results(open_study(config, folder))
    front = sorted(results.front(), key=lambda r: -r.measured.get(results.metric, 0))
    header = columns(results)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.study}: feasible Pareto front ({len(front)} of "
                        f"{len(results.rows)} trials), hypervolume {results.hypervolume():.4f}; "
                        f"{results.metric} on the validation split, size in file bytes")  # fmt: skip
    for name in header:
        table.add_column(name, justify="right")
    for row in front:
        table.add_row(*[_fmt(v) for v in row_values(results, row)])
    Console(width=140).print(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*header, "on_front", "state"])
    on_front = {r.number for r in front}
    for row in results.rows:
        if row.state in ("COMPLETE", "PRUNED"):
            state = "SCREENED" if row.screened else row.state
            writer.writerow([*row_values(results, row), row.number in on_front, state])
    write_text_atomic(folder.path / "pareto.csv", buffer.getvalue())
    write_bytes_atomic(folder.path / "pareto.png", _plot(results, front))
    print(f"front: {folder.path / 'pareto.csv'}, plot: {folder.path / 'pareto.png'}, "
          f"trials: {folder.path / 'trials'}")  # fmt: skip
    return results


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(results: StudyResults, front: list[TrialRow]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in results.rows if r.state == "COMPLETE" and r.measured]
    cost = next((n for n in _names(results)[1:]), "latency_ms")
    figure, axes = plt.subplots(figsize=(7, 5))
    for rows, style, label in (
        ([r for r in done if r.feasible], "o", "feasible"),
        ([r for r in done if not r.feasible and not r.screened], "x", "infeasible"),
        ([r for r in done if r.screened], "+", "screened (bound broken, not fine-tuned)"),
    ):
        if rows:
            sizes = [max(8.0, 1.5e3 * r.measured.get("size_bytes", 0) / max(
                results.teacher.get("size_bytes", 1), 1)) for r in rows]  # fmt: skip
            axes.scatter([r.measured[cost] for r in rows], [r.measured[results.metric] for r in rows],
                         s=sizes, marker=style, alpha=0.25 if style == "+" else 0.6,
                         label=label)  # fmt: skip
    ordered = sorted(front, key=lambda r: r.measured[cost])
    axes.plot([r.measured[cost] for r in ordered], [r.measured[results.metric] for r in ordered],
              "k--", linewidth=1, label="feasible front")  # fmt: skip
    axes.axhline(results.teacher[results.metric], color="grey", linewidth=0.8, label="teacher")
    axes.set_xlabel(cost)
    axes.set_ylabel(results.metric)
    axes.set_title("trials (marker area ∝ artifact size)")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    show_front(StudyFolder(Path(args.study)))
    return 0
