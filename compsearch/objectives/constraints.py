"""Constraints: budgets a feasible point must meet, kept apart from the objectives.

Each is ``value − limit`` (feasible when ≤ 0) and goes to Optuna with ``trial.set_constraint``, so
the sampler treats it as a constraint rather than a penalty. Names and what they bound:

* ``accuracy_drop`` — drop of the primary metric vs the teacher; ``"3%"`` bounds the drop relative
  to the teacher's value, a plain number bounds it in the metric's own units;
* ``latency_ms`` — measured latency; also accepts ``"500 ms"`` / ``"0.5 s"``;
* ``size_bytes`` — artifact size; also accepts ``"2 GB"``, ``"900 KB"`` (decimal units).
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
    relative: bool = False  # accuracy_drop given in percent of the teacher's value

    def value(self, measured: dict[str, float], metric: str) -> float:
        """``measured − limit``: ≤ 0 is feasible."""
        if self.name == "accuracy_drop":
            drop = measured[f"{metric}_drop_rel" if self.relative else f"{metric}_drop"]
            return drop - self.limit
        return measured[self.name] - self.limit

    def describe(self) -> str:
        if self.name == "accuracy_drop":
            return (
                f"accuracy drop <= {self.limit * 100:g}%"
                if self.relative
                else (f"accuracy drop <= {self.limit:g}")
            )
        if self.name == "latency_ms":
            return f"latency <= {self.limit:g} ms"
        return f"size <= {self.limit / 1e6:g} MB"


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
    if name == "latency_ms":
        match = re.fullmatch(number + r"(ms|s|us)?", text)
        if not match or isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a time like 500, '500 ms' or '0.5 s', but got {value!r}."
            )
        return Constraint(name, float(match.group(1)) * _TIME_UNITS[match.group(2) or "ms"])
    if name == "size_bytes":
        match = re.fullmatch(number + r"(b|kb|mb|gb|kib|mib|gib)?", text)
        if not match or isinstance(value, bool):
            raise ConfigError(
                f"{path}: expected a size like 2000000, '2 MB' or '2 GB', but got {value!r}."
            )
        return Constraint(name, float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])
    raise ConfigError(
        f"{path}: unknown constraint {name!r}; the allowed constraints are: accuracy_drop, "
        "latency_ms, size_bytes."
    )
