"""``compsearch pareto runs/<study>``: the feasible front as a table, ``pareto.csv`` and ``pareto.png``."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from compsearch._files import write_bytes_atomic, write_text_atomic
from compsearch.objectives.constraints import format_bytes
from compsearch.search import StudyFolder, load_results
from compsearch.search.explain import explain
from compsearch.search.results import STUDY_ATTR, StudyResults, TrialRow
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
    return ["trial", *names, f"{results.metric}_drop", "speedup", "size_ratio", "float_share",
            "feasible", "latency_source", "latency_ci"]  # fmt: skip


def row_values(results: StudyResults, row: TrialRow) -> list[object]:
    names = _names(results)
    m = row.measured
    return [row.number, *[m.get(n) for n in names], m.get(f"{results.metric}_drop"),
            m.get("speedup"), m.get("size_ratio"), m.get("float_share"), row.feasible,
            m.get("latency_source", "measured"), m.get("latency_ci")]  # fmt: skip


def show_front(folder: StudyFolder) -> StudyResults:
    config = folder.frozen()
    study = open_study(config, folder)
    results = load_results(study)
    front = sorted(results.front(), key=lambda r: -r.measured.get(results.metric, 0))
    header = columns(results)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.study}: feasible Pareto front ({len(front)} of "
                        f"{len(results.rows)} trials), hypervolume {results.hypervolume():.4f}; "
                        f"{results.metric} on the validation split, size of the file, latency "
                        "± its 95% interval")  # fmt: skip
    for name in header:
        table.add_column(name, justify="right")
    for row in front:
        cells = [_fmt(v) for v in row_values(results, row)]
        for index, name in enumerate(header):  # units a reader can take in at a glance
            value = row.measured.get(name)
            if name == "size_bytes" and isinstance(value, (int, float)):
                cells[index] = format_bytes(value)
            elif name == "latency_ms" and isinstance(row.measured.get("latency_ci"), float):
                cells[index] = f"{value:.4g} ±{row.measured['latency_ci'] * 100:.0f}%"
        table.add_row(*cells)
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
    setup = study.user_attrs.get(STUDY_ATTR, {}).get("latency_setup", "")
    write_bytes_atomic(folder.path / "pareto.png", _plot(results, front, config.constraints, setup))
    print(f"front: {folder.path / 'pareto.csv'}, plot: {folder.path / 'pareto.png'}, "
          f"trials: {folder.path / 'trials'}")  # fmt: skip
    for line in explain(results, config.constraints):
        print(line)
    return results


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(results: StudyResults, front: list[TrialRow], constraints=(), setup: str = "") -> bytes:
    """Accuracy against each cost objective, one panel per cost (a 3-objective front is not a 2-D
    line: with more than one cost, front points are marked, not joined). Bounds are drawn as lines;
    stopped and screened trials faintly; marker area is the artifact's size (legend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in results.rows if r.state in ("COMPLETE", "PRUNED") and r.measured
            and results.metric in r.measured]  # fmt: skip
    costs = [n for n in _names(results)[1:] if any(n in r.measured for r in done)] or ["latency_ms"]
    figure, panels = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 5), squeeze=False)
    teacher_size = max(results.teacher.get("size_bytes", 1), 1)

    def area(row: TrialRow) -> float:
        return max(8.0, 300 * row.measured.get("size_bytes", 0) / teacher_size)

    groups = (
        ([r for r in done if r.state == "COMPLETE" and r.feasible and not r.screened], "o", 0.6,
         "feasible"),
        ([r for r in done if r.state == "COMPLETE" and not r.feasible and not r.screened], "x", 0.6,
         "infeasible"),
        ([r for r in done if r.screened], "+", 0.2, "screened (bound broken, not fine-tuned)"),
        ([r for r in done if r.state == "PRUNED"], ".", 0.2, "stopped at a rung"),
    )  # fmt: skip
    # a relative latency bound: latency is drawn as the ratio timed beside the teacher, the number
    # the bound is checked on (absolute times measured minutes apart carry the machine's load)
    relative = any(c.name == "latency_ms" and c.relative for c in constraints)

    def x(row: TrialRow, cost: str) -> float:
        if cost == "latency_ms" and relative:
            speedup = row.measured.get("speedup")
            return 1 / speedup if speedup else row.measured[cost] / results.teacher[cost]
        return row.measured[cost]

    for axes, cost in zip(panels[0], costs, strict=True):
        for rows, marker, alpha, label in groups:
            rows = [r for r in rows if cost in r.measured]
            if rows:
                axes.scatter([x(r, cost) for r in rows],
                             [r.measured[results.metric] for r in rows], s=[area(r) for r in rows],
                             marker=marker, alpha=alpha, label=label)  # fmt: skip
        on_front = sorted([r for r in front if cost in r.measured], key=lambda r: x(r, cost))
        if on_front:
            xs = [x(r, cost) for r in on_front]
            ys = [r.measured[results.metric] for r in on_front]
            axes.scatter(xs, ys, s=[area(r) for r in on_front], facecolors="none",
                         edgecolors="black", linewidths=1.2, label="feasible front")  # fmt: skip
            if len(costs) == 1:  # a 2-objective front is a staircase
                axes.step(xs, ys, "k--", where="post", linewidth=0.8)
        axes.axhline(results.teacher[results.metric], color="grey", linewidth=0.8,
                     label="teacher")  # fmt: skip
        for constraint in constraints:
            if constraint.name == cost:
                bound = constraint.limit if cost == "latency_ms" and relative else (
                    constraint.absolute(results.teacher))  # fmt: skip
                axes.axvline(bound, color="red", linestyle=":", label=constraint.describe())
            elif constraint.name == "accuracy_drop":
                axes.axhline(_accuracy_bound(constraint, results), color="red", linestyle="-.",
                             label=constraint.describe())  # fmt: skip
        axes.set_xlabel(_axis_label(cost, setup, relative))
        axes.set_ylabel(f"{results.metric} (validation split)")
    for size in (0.1, 0.5, 1.0):  # the marker-size legend
        panels[0][0].scatter([], [], s=max(8.0, 300 * size), color="grey", alpha=0.4,
                             label=f"size {size:g}x the teacher's")  # fmt: skip
    panels[0][0].legend(fontsize=7, loc="best")
    figure.suptitle(f"{len(front)} feasible front points of {len(done)} measured trials "
                    "(marker area: artifact size)")  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _accuracy_bound(constraint, results: StudyResults) -> float:
    """The accuracy-drop bound as a value of the metric (a drop: below the teacher where higher is
    better, above it where lower is, like perplexity)."""
    teacher = results.teacher[results.metric]
    drop = constraint.limit * abs(teacher) if constraint.relative else constraint.limit
    return teacher - drop if results.direction == "maximize" else teacher + drop


def _axis_label(cost: str, setup: str, relative: bool = False) -> str:
    what = f" ({setup})" if setup else ""
    if cost == "latency_ms" and relative:
        return f"latency ÷ the teacher's, timed side by side{what}"
    if cost == "latency_ms":
        return f"latency, ms per batch{what}"
    if cost == "size_bytes":
        return "size, bytes of the file that ships"
    return cost


def run(args: argparse.Namespace) -> int:
    show_front(StudyFolder(Path(args.study)))
    return 0
