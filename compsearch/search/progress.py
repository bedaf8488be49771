"""A live progress line: trials done / total, failures, front size and hypervolume."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Column

from compsearch.search.results import StudyResults


class ProgressBar:
    def __init__(self, total: int, study: str, console=None) -> None:
        # done/total first and a short bar, so the line fits 80 columns with the count visible
        self.bar = RichProgress(
            TextColumn(f"[bold]{study[:16]}[/bold]"),
            MofNCompleteColumn(
                table_column=Column(no_wrap=True, min_width=len(f"{total}/{total}"))
            ),
            BarColumn(bar_width=12),
            # the description gives way first (cut with an ellipsis), never the count
            TextColumn(
                "{task.description}",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            TimeElapsedColumn(),
            transient=False,
            disable=console is None and not sys.stderr.isatty(),
            console=console,
        )
        self.task = self.bar.add_task("", total=total)
        self.bar.start()

    def update(self, results: StudyResults) -> None:
        counts = results.counts()
        done = sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))
        front = results.front()
        text = (
            f"front {len(front)} · hv {results.hypervolume(front):.3f} · "
            f"failed {counts.get('FAIL', 0)} · stopped {counts.get('PRUNED', 0)}"
        )
        self.bar.update(self.task, completed=done, description=text)
        if not sys.stderr.isatty():
            print(f"trials {done}/{self.bar.tasks[0].total}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.stop()
