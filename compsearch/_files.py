"""Atomic file writes: a reader never sees half a file, and a failed write leaves the old one intact."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_TEMP_S = 60.0  # a temporary file older than this belongs to a writer that was killed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda temp: Path(temp).write_bytes(data))


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(temp)`` fills a temporary file beside ``path``, which is synced to disk and then
    becomes ``path`` in one rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(handle)
        write(temp)
        with open(temp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the ``.<name>.*.tmp`` files a killed writer left under ``folder``; younger ones may
    belong to a live writer and stay. Returns how many were removed."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in Path(folder).rglob(".*.tmp"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def remove_stale_folders(parent: str | os.PathLike, prefix: str,
                         older_than_s: float = STALE_TEMP_S) -> int:  # fmt: skip
    """Delete the folders named ``prefix…`` in ``parent`` that a killed writer left (older than
    ``older_than_s``; a younger one may belong to a live writer). Returns how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in Path(parent).glob(f"{glob.escape(prefix)}*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def publish_folder(staging: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
    """Make ``staging`` the folder ``target`` in one step for readers: they see the old set of
    files or the new one, never a mix. Entries named in ``keep`` (checkpoints) move from the old
    folder into the new one. A kill part-way is finished by :func:`recover_folder`."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        recover_folder(target)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    recover_folder(target, keep)


def recover_folder(target: Path, keep: tuple[str, ...] = ("checkpoints",)) -> None:
    """Finish an interrupted :func:`publish_folder`: put the old folder back if the new one never
    arrived; otherwise carry over what it keeps and remove the old one."""
    old = target.with_name(f".{target.name}.old")
    if not old.exists():
        return
    if not target.exists():
        os.replace(old, target)
        return
    for name in keep:
        if (old / name).exists() and not (target / name).exists():
            os.replace(old / name, target / name)
    shutil.rmtree(old, ignore_errors=True)
