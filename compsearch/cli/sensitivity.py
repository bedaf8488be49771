"""``compsearch sensitivity runs/<study>``: the study's sensitivity table, printed and drawn.

Reads the table the study measured (``runs/<study>/sensitivity.json``), or measures it now, and
prints, per searched unit and choice, the output loss against the teacher and the size and latency
of that single change; writes a heat map (units × choices, colour = log10 of the loss) to
``runs/<study>/sensitivity.png``.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

from compsearch._files import write_bytes_atomic
from compsearch.search import StudyFolder
from compsearch.search.prepare import prepare_study
from compsearch.search.sensitivity import Sensitivity, load_or_measure, read


def add_parser(commands) -> None:
    parser = commands.add_parser("sensitivity", help="per-unit sensitivity of a study's space")
    parser.add_argument("study", help="the study folder, runs/<study>")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    folder = StudyFolder(Path(args.study))
    table = read(folder.path)
    if table is None:
        config = folder.frozen()
        ctx, study = prepare_study(config, folder)
        table = load_or_measure(ctx, study, config.search.sensitivity_batches)
    show(table)
    path = folder.path / "sensitivity.png"
    write_bytes_atomic(path, heat_map(table))
    print(f"heat map: {path}")
    return 0


def show(table: Sensitivity) -> None:
    costs = [c for c in ("size_bytes", "latency_ms") if c in table.base]
    print(f"reference (every unit at its most precise choice): loss {table.base['loss']:.3g}, "
          + ", ".join(f"{c} {table.base[c]:.4g}" for c in costs))  # fmt: skip
    print(f"{'unit':<40} {'choice':>8} {'loss':>10} " + " ".join(f"{c:>12}" for c in costs))
    for param, entries in table.options.items():
        for key, entry in entries.items():
            print(f"{param:<40} {key:>8} {entry['loss']:>10.3g} "
                  + " ".join(f"{entry[c]:>12.4g}" for c in costs))  # fmt: skip
    for cost in costs:  # the cost model in use per cost, and every form's error
        errors = table.model_error.get(cost) or (
            {"log-linear": table.fit_error[cost]} if cost in table.fit_error else {}
        )
        if errors:
            form = table.model.get(cost, "log-linear")
            detail = ", ".join(f"{name} {e * 100:.1f} %" for name, e in errors.items())
            print(
                f"cost model for {cost} (predictions): {form}; median error on the random "
                f"recipes {detail}"
            )
    print(f"measured in {table.seconds:.0f} s")


def heat_map(table: Sensitivity) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    params = list(table.options)
    width = max((len(e) for e in table.options.values()), default=1)
    grid = np.full((len(params), width), np.nan)
    figure, axes = plt.subplots(figsize=(1.2 * width + 4, 0.35 * len(params) + 1.5))
    for row, param in enumerate(params):
        for column, (key, entry) in enumerate(table.options[param].items()):
            grid[row, column] = math.log10(max(entry["loss"], 1e-9))
            axes.text(column, row, key, ha="center", va="center", fontsize=7)
    image = axes.imshow(grid, aspect="auto", cmap="viridis")
    axes.set_yticks(range(len(params)), params, fontsize=7)
    axes.set_xticks([])
    axes.set_xlabel("choices on the unit's menu (labels in the cells)")
    figure.colorbar(image, label="log10 output loss vs the teacher (no fine-tune)")
    axes.set_title("sensitivity: one unit changed at a time")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
