"""Where compsearch keeps what it writes: the runs root (``./runs`` unless ``COMPSEARCH_RUNS`` is set)."""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "COMPSEARCH_RUNS"


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def teachers_dir(root: Path | None = None) -> Path:
    """Trained teachers shared by every study under the runs root."""
    return (root or runs_root()) / "_teachers"
