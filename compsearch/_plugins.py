"""Plug-ins named ``module.path:name``: imported only because the user's own config or code names
them (never because a recipe or an artifact does)."""

from __future__ import annotations

import importlib
from typing import Any

from compsearch.errors import CompsearchError


def import_target(target: str, path: str, error: type[CompsearchError]) -> Any:
    """The object ``module.path:name`` names; ``error`` (with ``path``, the field) if it cannot be
    loaded."""
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as problem:
        raise error(
            f"{path}: expected an importable 'module.path:name', but loading {target!r} failed "
            f"({problem})."
        ) from None
