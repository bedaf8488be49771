"""Strict parsing of plain data (YAML mappings) into typed values, with errors that name the field.

Recipes and study configs share these validators. Each validator takes ``(value, path)`` and returns
the parsed value or raises the caller's error class with a message naming ``path``, what is allowed
and what was received. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from compsearch.errors import CompsearchError

Validator = Callable[[Any, str], Any]


class Schema:
    """A set of validators bound to the error class a module raises."""

    def __init__(self, error: type[CompsearchError], fix: str = "") -> None:
        self.error = error
        self.fix = fix

    def fail(self, path: str, allowed: str, got: Any) -> CompsearchError:
        message = f"{path}: expected {allowed}, but got {got!r}."
        if self.fix:
            message += f" {self.fix}"
        return self.error(message)

    # -- scalar validators -------------------------------------------------------------------------

    def integer(self, lo: int | None = None, hi: int | None = None) -> Validator:
        def check(value: Any, path: str) -> int:
            bounds = _bounds_text(lo, hi)
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"an integer{bounds}", value)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise self.fail(path, f"an integer{bounds}", value)
            return value

        return check

    def one_of(self, allowed: Iterable[Any], note: str = "") -> Validator:
        options = tuple(allowed)

        def check(value: Any, path: str) -> Any:
            for option in options:
                if type(value) is type(option) and value == option:
                    return value
            text = "one of " + ", ".join(repr(o) for o in options)
            raise self.fail(path, text + (f" ({note})" if note else ""), value)

        return check

    def number(
        self,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> Validator:
        def check(value: Any, path: str) -> float:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            if lo is not None and hi is not None:
                allowed = f"a number in {left}{lo}, {hi}{right}"
            elif lo is not None:
                allowed = f"a number {'>' if lo_open else '>='} {lo}"
            elif hi is not None:
                allowed = f"a number {'<' if hi_open else '<='} {hi}"
            else:
                allowed = "a number"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(path, allowed, value)
            value = float(value)
            if math.isnan(value) or math.isinf(value):
                raise self.fail(path, allowed, value)
            if lo is not None and (value < lo or (lo_open and value == lo)):
                raise self.fail(path, allowed, value)
            if hi is not None and (value > hi or (hi_open and value == hi)):
                raise self.fail(path, allowed, value)
            return value

        return check

    def boolean(self) -> Validator:
        def check(value: Any, path: str) -> bool:
            if not isinstance(value, bool):
                raise self.fail(path, "true or false", value)
            return value

        return check

    def string(self, pattern: str | None = None, what: str = "a string") -> Validator:
        compiled = re.compile(pattern) if pattern else None

        def check(value: Any, path: str) -> str:
            if not isinstance(value, str) or (compiled and not compiled.fullmatch(value)):
                raise self.fail(path, what, value)
            return value

        return check

    def optional(self, inner: Validator) -> Validator:
        def check(value: Any, path: str) -> Any:
            return None if value is None else inner(value, path)

        return check

    def list_of(self, inner: Validator) -> Validator:
        def check(value: Any, path: str) -> tuple:
            if not isinstance(value, (list, tuple)):
                raise self.fail(path, "a list", value)
            return tuple(inner(item, f"{path}[{i}]") for i, item in enumerate(value))

        return check

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, "a mapping of keys to values", value)
        for key in value:
            if not isinstance(key, str):
                raise self.fail(f"{path} key", "a string", key)
        return value

    # -- records -----------------------------------------------------------------------------------

    def record(
        self,
        value: Any,
        path: str,
        fields: Mapping[str, Validator],
        required: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Check a mapping against named field validators: no unknown keys, required keys present."""
        data = self.mapping(value, path)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            allowed = ", ".join(sorted(fields))
            raise self.error(
                f"{path}: unknown key {unknown[0]!r}; the allowed keys are: {allowed}."
                + _did_you_mean(unknown[0], fields)
            )
        missing = [name for name in required if name not in data]
        if missing:
            raise self.error(f"{path}: the key {missing[0]!r} is required but missing.")
        return {name: fields[name](data[name], child(path, name)) for name in data}


def child(path: str, name: str) -> str:
    """The path of field ``name`` under ``path``: ``config.search``, or ``digits.yaml: search``
    when ``path`` is the file itself."""
    return f"{path}: {name}" if path.endswith((".yaml", ".yml")) else f"{path}.{name}"


def _bounds_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def yaml_error(path: object, error: Exception, what: str = "YAML") -> str:
    """One line: the file, line and column, then the parser's own words."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    detail = " ".join(str(getattr(error, "problem", None) or error).split())
    context = getattr(error, "context", None)
    if context:
        detail = f"{' '.join(context.split())}, {detail}"
    return f"{where}: expected {what}, but it does not parse: {detail}."
