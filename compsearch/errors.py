"""The exceptions compsearch raises on purpose.

Every error a user can cause derives from :class:`CompsearchError`, so a caller can catch the whole
family in one clause. Messages follow one shape: what was expected, what was received, how to fix it.
:func:`expected` builds that shape so every module words its errors the same way.
"""

from __future__ import annotations


class CompsearchError(Exception):
    """Root of every error compsearch raises on purpose."""


class ConfigError(CompsearchError):
    """A study config is malformed: unknown key, wrong type, impossible value."""


class RecipeError(CompsearchError):
    """A recipe is malformed or does not fit the model it is applied to."""


class SpaceError(CompsearchError):
    """A search space cannot be built: an empty choice, an unknown region, a bad range."""


class TaskError(CompsearchError):
    """A task cannot be resolved, built or evaluated."""


class StorageError(CompsearchError):
    """A study storage cannot be opened, or holds something other than what was expected."""


class TrialError(CompsearchError):
    """A trial failed for a reason that belongs to the trial (NaN loss, impossible combination)."""


class KernelError(CompsearchError):
    """A compression kernel was asked for something it cannot do (bad bits, bad keep ratio)."""


class ExportError(CompsearchError):
    """A serving format cannot express what an artifact holds, or its export failed."""


def expected(what: str, got: object, fix: str | None = None) -> str:
    """Word an error as 'expected X, but got Y. Fix.'"""
    message = f"expected {what}, but got {got!r}."
    if fix:
        message += f" {fix}"
    return message
