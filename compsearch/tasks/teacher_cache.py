"""Trained teachers, trained once and kept under the runs root with a checksum.

A cached teacher is ``<name>-<key>.safetensors`` plus ``<name>-<key>.sha256``. The key hashes
everything the weights depend on (architecture, data, training settings, the cache format), so a
change to any of them trains a new teacher instead of loading a stale one. The checksum covers the
whole file: a file that was truncated or altered is detected, reported and retrained, never used.
A lock file makes concurrent workers train it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import nn

from compsearch._files import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_key(settings: dict) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_state_dict(
    directory: Path,
    name: str,
    settings: dict,
    train: Callable[[], tuple[nn.Module, dict[str, float]]],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load the teacher for ``settings`` from ``directory``, training and saving it if needed.

    ``train()`` returns the trained model and its held-out metrics; they are stored in the file's
    metadata. Returns the state dict and those metrics.
    """
    key = cache_key(settings)
    weights = directory / f"{name}-{key}.safetensors"
    checksum = directory / f"{name}-{key}.sha256"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loaded = _load_verified(weights, checksum)
        if loaded is not None:
            return loaded
        model, metrics = train()
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        metadata = {"task": name, "key": key, "metrics": json.dumps(metrics)}
        data = save(state, metadata=metadata)
        write_bytes_atomic(weights, data)
        write_text_atomic(checksum, hashlib.sha256(data).hexdigest() + "\n")
        return state, metrics


def _load_verified(
    weights: Path, checksum: Path
) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
    if not weights.exists():
        return None
    data = weights.read_bytes()
    expected = checksum.read_text().strip() if checksum.exists() else None
    actual = hashlib.sha256(data).hexdigest()
    if expected != actual:
        log.warning(
            "cached teacher %s failed its checksum (expected %s, found %s); retraining it",
            weights,
            expected,
            actual,
        )
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        metrics = json.loads(handle.metadata().get("metrics", "{}"))
    return load(data), metrics
