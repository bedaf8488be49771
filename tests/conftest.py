"""Shared fixtures: one runs root per test session, so trained teachers are trained once."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, saying so, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    previous = os.environ.get("COMPSEARCH_RUNS")
    os.environ["COMPSEARCH_RUNS"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("COMPSEARCH_RUNS", None)
    else:
        os.environ["COMPSEARCH_RUNS"] = previous


@pytest.fixture(scope="session")
def digits_task(runs_root):
    from compsearch.tasks import get_task

    return get_task("digits", runs_root=runs_root)


@pytest.fixture(scope="session")
def mnist_task(runs_root):
    from compsearch.tasks import get_task

    return get_task("mnist", runs_root=runs_root)


@pytest.fixture(scope="session")
def minilm_task(runs_root):
    from compsearch.tasks import get_task

    return get_task("minilm", runs_root=runs_root)
