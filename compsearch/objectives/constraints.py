"""Constraints: budgets a feasible point must meet, kept apart from the objectives.

Each is ``value − limit`` (feasible when ≤ 0) and goes to Optuna as the trial's constraint values
(see compsearch.search.trial.store_constraints), so the sampler treats it as a constraint rather
than a penalty. Names and what they bound:

* ``accuracy_drop`` — drop of the primary metric vs the teacher; ``"3%"`` bounds the drop relative
  to the teacher's value, a plain number bounds it in the metric's own units;
* ``latency_ms`` — measured latency; also accepts ``"500 ms"`` / ``"0.5 s"``;
* ``size_bytes`` — artifact size; also accepts ``"2 GB"``, ``"900 KB"`` (decimal units).

Latency and size bounds may also be relative to the teacher measured in the same study: ``"0.5x"``
(half the teacher's latency), ``size_bytes: "0.125x"`` (an eighth of its file). A relative latency
bound is checked on the ratio measured with the teacher interleaved in the same process (see
compsearch.objectives.latency), so it holds on a fast machine and on a loaded one alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from compsearch.errors import ConfigError

_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3}


@dataclass(frozen=True)
class Constraint:
    name: str  # accuracy_drop | latency_ms | size_bytes
    limit: float
    #: accuracy_drop: given in percent of the teacher's value; latency_ms / size_bytes: a
    #: multiple of the teacher's (``"0.5x"``)
    relative: bool = False

    def value(self, measured: dict[str, float], metric: str) -> float:
        """``measured − limit``: ≤ 0 is feasible (a relative bound: the ratio to the teacher)."""
        if self.name == "accuracy_drop":
            drop = measured[f"{metric}_drop_rel" if self.relative else f"{metric}_drop"]
            return drop - self.limit
        if self.relative:
            return ratio_to_teacher(self.name, measured) - self.limit
        return measured[self.name] - self.limit

    def absolute(self, teacher: dict[str, float]) -> float:
        """The bound in the measurement's own units, given the teacher's values."""
        if self.relative and self.name != "accuracy_drop":
            return self.limit * teacher[self.name]
        return self.limit

    def fraction(self, teacher: dict[str, float]) -> float:
        """A latency or size bound as a fraction of the teacher's value."""
        return self.limit if self.relative else self.limit / teacher[self.name]

    def describe(self) -> str:
        if self.name == "accuracy_drop":
            return (
                f"accuracy drop <= {self.limit * 100:g}%"
                if self.relative
                else (f"accuracy drop <= {self.limit:g}")
            )
        what = "latency" if self.name == "latency_ms" else "size"
        if self.relative:
            return f"{what} <= {self.limit:g}x the teacher's"
        if self.name == "latency_ms":
            return f"latency <= {self.limit:g} ms"
        return f"size <= {format_bytes(self.limit)}"


def ratio_to_teacher(name: str, measured: dict[str, float]) -> float:
    """A candidate's latency or size as a multiple of the teacher's: latency from the ratio
    measured interleaved with the teacher (``speedup``), size from the file bytes
    (``size_ratio``)."""
    return 1.0 / measured["speedup" if name == "latency_ms" else "size_ratio"]


def format_bytes(count: float) -> str:
    """Decimal units, as constraints are written: ``812 B``, ``87.3 KB``, ``1.95 MB``, ``2 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def parse_constraint(name: str, value: Any, path: str) -> Constraint:
    """One entry of the config's ``constraints:`` mapping."""
    text = str(value).strip().lower().replace(" ", "")
    number = r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)"
    if name == "accuracy_drop":
        match = re.fullmatch(number + r"(%?)", text)
        if not match or isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a number or a percentage like '3%', but got {value!r}."
            )
        limit = float(match.group(1))
        return Constraint(name, limit / 100 if match.group(2) else limit, bool(match.group(2)))
    ratio = re.fullmatch(number + r"x", text)
    if name in ("latency_ms", "size_bytes") and ratio and not isinstance(value, bool):
        if not float(ratio.group(1)) > 0:
            raise ConfigError(
                f"{path}: expected a positive multiple like '0.5x', but got {value!r}."
            )
        return Constraint(name, float(ratio.group(1)), relative=True)
    if name == "latency_ms":
        match = re.fullmatch(number + r"(ms|s|us)?", text)
        if not match or isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a time like 500, '500 ms' or '0.5 s', or a multiple of the "
                f"teacher's latency like '0.5x', but got {value!r}."
            )
        return Constraint(name, float(match.group(1)) * _TIME_UNITS[match.group(2) or "ms"])
    if name == "size_bytes":
        match = re.fullmatch(number + r"(b|kb|mb|gb|kib|mib|gib)?", text)
        if not match or isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a size like 2000000, '2 MB' or '2 GB', or a multiple of the "
                f"teacher's size like '0.125x', but got {value!r}."
            )
        return Constraint(name, float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])
    raise ConfigError(
        f"{path}: unknown constraint {name!r}; the allowed constraints are: accuracy_drop, "
        "latency_ms, size_bytes."
    )
