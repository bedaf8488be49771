"""The ``space:`` section of a study config: menus, ranges, grouping, regions and rules.

Everything is checked when the config is read; errors name the field (``space.rules[2].w_bits``),
what is allowed and what was received. A range is a two-item list ``[low, high]``; a single value
fixes the setting (it is then not searched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compsearch._schema import Schema
from compsearch.errors import ConfigError, KernelError, SpaceError
from compsearch.kernels.formats import FORMATS, load_format
from compsearch.recipes.schema import A_BITS, GROUP_SIZES, ROUNDING_METHODS, W_BITS

_S = Schema(ConfigError)
GROUPINGS = ("per_layer", "per_block", "per_region", "global")


@dataclass(frozen=True)
class Range:
    """A searched number (``low < high``) or a fixed one (``low == high``)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @property
    def fixed(self) -> bool:
        return self.low == self.high


@dataclass(frozen=True)
class Rule:
    """Fix or restrict choices for the layers / groups / blocks a pattern (or a region) matches."""

    index: int
    match: str | None
    region: str | None
    w_bits: tuple[int, ...] | None = None
    a_bits: tuple[int, ...] | None = None
    keep_ratio: Range | None = None
    keep: bool | None = None
    source: str = "config"

    def describe(self) -> str:
        where = f"match {self.match!r}" if self.match else f"region {self.region!r}"
        return f"space.rules[{self.index}] ({where})" if self.source == "config" else self.source


@dataclass(frozen=True)
class Menu:
    """What a region (or the whole model) may choose from."""

    w_bits: tuple[int, ...] = (4, 8, 16)
    a_bits: tuple[int, ...] = (8, 16)
    granularity: tuple[str, ...] = ("per_channel",)
    group_size: tuple[int, ...] = (128,)  # per_group choices, one per size
    method: tuple[str, ...] = ("rtn",)  # how weights are rounded: rtn, gptq, awq (Linear layers)
    keep_ratio: Range = field(default_factory=lambda: Range(0.25, 1.0, step=0.125))
    grouping: str = "per_block"


@dataclass(frozen=True)
class SpaceConfig:
    menu: Menu = field(default_factory=Menu)
    w_formats: tuple[str, ...] = ("int",)
    activation_mode: str = "static"
    round_to: int = 8
    importance: str = "l1"
    order: str = "prune_first"
    prune_steps: int = 1
    depth: bool = False
    alpha: Range = field(default_factory=lambda: Range(0.0, 1.0))
    temperature: Range = field(default_factory=lambda: Range(1.0, 8.0))
    feature_weight: Range = field(default_factory=lambda: Range(0.0, 0.0))
    attn_weight: Range = field(default_factory=lambda: Range(0.0, 0.0))
    lr: Range = field(default_factory=lambda: Range(1e-4, 1e-2, log=True))
    observer: str = "minmax"
    calibration_batches: int = 8
    defaults: dict[str, bool] = field(
        default_factory=lambda: {"first_layer": True, "output_layer": True, "projector": True}
    )
    regions: dict[str, Menu] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()


# -- parsing ---------------------------------------------------------------------------------------


def _range(
    lo: float | None, hi: float | None, log: bool = False, lo_open: bool = False, step: bool = False
):
    number = _S.number(lo, hi, lo_open=lo_open)

    def check(value: Any, path: str) -> Range:
        if isinstance(value, dict):
            data = _S.record(value, path, {"low": number, "high": number,
                                           "step": _S.number(0.0, None, lo_open=True),
                                           "log": _S.boolean()}, required=("low", "high"))  # fmt: skip
            bounds = Range(data["low"], data["high"], data.get("log", log), data.get("step"))
        elif isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise _S.fail(path, "a number or a two-item range [low, high]", value)
            bounds = Range(number(value[0], f"{path}[0]"), number(value[1], f"{path}[1]"), log)
        else:
            fixed = number(value, path)
            bounds = Range(fixed, fixed, log)
        if bounds.low > bounds.high:
            raise ConfigError(
                f"{path}: expected low <= high, but got low={bounds.low}, high={bounds.high}."
            )
        if bounds.log and bounds.low <= 0:
            raise ConfigError(
                f"{path}: expected a positive low end on a log scale, got {bounds.low}."
            )
        if step and bounds.step is None and not bounds.fixed:
            bounds = Range(bounds.low, bounds.high, bounds.log, 0.05)
        return bounds

    return check


def _bits(allowed: tuple[int, ...], note: str):
    one = _S.one_of(allowed, note=note)

    def check(value: Any, path: str) -> tuple[int, ...]:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise _S.fail(path, f"a non-empty list of {', '.join(map(str, allowed))}", value)
        return tuple(one(v, f"{path}[{i}]") for i, v in enumerate(values))

    return check


_W = _bits(W_BITS, "16 keeps weights in float")
_A = _bits(A_BITS, "16 keeps activations in float")
_KEEP = _range(0.0, 1.0, lo_open=True, step=True)


def _one_or_more(check):
    """A value or a list of values, each checked, as a tuple."""
    return lambda v, p: tuple(
        check(x, f"{p}[{i}]") for i, x in enumerate(v if isinstance(v, (list, tuple)) else [v])
    )


def _menu_fields():
    return {
        "w_bits": _W,
        "a_bits": _A,
        "granularity": lambda v, p: tuple(
            _S.one_of(("per_channel", "per_group"))(x, f"{p}[{i}]")
            for i, x in enumerate(v if isinstance(v, (list, tuple)) else [v])
        ),
        "group_size": _one_or_more(_S.one_of(GROUP_SIZES)),
        "method": _one_or_more(_S.one_of(ROUNDING_METHODS, note="how weights are rounded")),
        "keep_ratio": _KEEP,
        "grouping": _S.one_of(GROUPINGS),
    }


def _menu(value: Any, path: str, base: Menu) -> Menu:
    data = _S.record(value, path, _menu_fields())
    fields = {**base.__dict__, **data}
    return Menu(**fields)


def _rules(value: Any, path: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise _S.fail(path, "a list of rules", value)
    rules = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        data = _S.record(item, where, {
            "match": _S.string(what="a module name or 're:<pattern>'"),
            "region": _S.string(what="a region name"),
            "w_bits": _W,
            "a_bits": _A,
            "keep_ratio": _KEEP,
            "keep": _S.boolean(),
        })  # fmt: skip
        if ("match" in data) == ("region" in data):
            raise ConfigError(
                f"{where}: expected exactly one of 'match' or 'region', but got "
                f"{sorted(k for k in ('match', 'region') if k in data) or 'neither'}."
            )
        if len(data) == 1:
            raise ConfigError(
                f"{where}: expected a rule to set at least one choice, but it sets none."
            )
        rules.append(Rule(index, data.get("match"), data.get("region"), data.get("w_bits"),
                          data.get("a_bits"), data.get("keep_ratio"), data.get("keep")))  # fmt: skip
    return tuple(rules)


def _format_name(value: Any, path: str) -> str:
    """A registered format's name, or ``module.path:Class`` of the user's own (imported and
    registered here: the user's config names it)."""
    if isinstance(value, str) and ":" in value:
        try:
            return load_format(value).name
        except KernelError as error:
            raise SpaceError(f"{path}: {error}") from None
    return _S.one_of(tuple(FORMATS), "or 'module.path:Class'")(value, path)


def parse_space(value: Any, path: str = "space") -> SpaceConfig:
    """Parse the ``space:`` mapping of a study config into a :class:`SpaceConfig`."""
    value = {} if value is None else value
    menu_keys = set(_menu_fields())
    data = _S.mapping(value, path)
    menu_part = {k: v for k, v in data.items() if k in menu_keys}
    rest = {k: v for k, v in data.items() if k not in menu_keys}
    menu = _menu(menu_part, path, Menu())
    distill_fields = {
        "alpha": _range(0.0, 1.0),
        "temperature": _range(0.0, None, lo_open=True),
        "feature_weight": _range(0.0, None),
        "attn_weight": _range(0.0, None),
    }
    fields = {
        "w_formats": lambda v, p: _S.list_of(_format_name)(v, p),
        "activation_mode": _S.one_of(("static", "dynamic")),
        "round_to": _S.integer(1, 1024),
        "importance": _S.one_of(("l1", "l2", "taylor", "random")),
        "order": _S.one_of(("prune_first", "quantize_first")),
        "prune_steps": _S.integer(1, 100),
        "depth": _S.boolean(),
        "distill": lambda v, p: _S.record(v, p, distill_fields),
        "lr": _range(0.0, 1.0, log=True, lo_open=True),
        "observer": _S.one_of(("minmax", "percentile", "mse")),
        "calibration_batches": _S.integer(1, 100_000),
        "defaults": lambda v, p: _S.record(
            v, p, {k: _S.boolean() for k in ("first_layer", "output_layer", "projector")}
        ),
        "regions": lambda v, p: {
            name: _menu(item, f"{p}.{name}", menu) for name, item in _S.mapping(v, p).items()
        },
        "rules": _rules,
    }
    parsed = _S.record(rest, path, fields)
    distill = parsed.pop("distill", {})
    defaults = {**SpaceConfig().defaults, **parsed.pop("defaults", {})}
    config = SpaceConfig(menu=menu, defaults=defaults, **distill, **parsed)
    if "lr" in parsed and not config.lr.log:
        config = SpaceConfig(
            **{**config.__dict__, "lr": Range(config.lr.low, config.lr.high, True)}
        )
    return config


def check_regions(config: SpaceConfig, known: set[str]) -> None:
    """Regions named in the config must be regions of the task's model."""
    named = set(config.regions) | {r.region for r in config.rules if r.region}
    unknown = sorted(named - known)
    if unknown:
        have = ", ".join(sorted(known)) or "none (this task defines no regions)"
        raise SpaceError(
            f"space: expected region names of the model ({have}), but got {unknown[0]!r}. "
            "Use one of those names, or a 'match' pattern."
        )
