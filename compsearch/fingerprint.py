"""Content fingerprints: a model's architecture and weights, and a set of tensors (data).

A fingerprint is ``sha256:<16 hex>``: short enough to read in a recipe, long enough that two
different models or data sets do not collide in practice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

_DIGITS = 16


def _update_with_tensor(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer: names, shapes, dtypes and values."""
    return named_fingerprint(sorted(model.state_dict(keep_vars=False).items()))


def named_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`model_fingerprint` of a state dict given as ``(name, tensor)`` pairs in name order,
    one at a time (a model too big to hold whole is hashed as its file is read)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        _update_with_tensor(digest, tensor)
    return f"sha256:{digest.hexdigest()[:_DIGITS]}"


def tensors_fingerprint(tensors: Iterable[torch.Tensor], salt: str = "") -> str:
    """Hash of a sequence of tensors (e.g. the batches a cache was computed on)."""
    digest = hashlib.sha256(salt.encode())
    for tensor in tensors:
        _update_with_tensor(digest, tensor)
    return f"sha256:{digest.hexdigest()[:_DIGITS]}"


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
