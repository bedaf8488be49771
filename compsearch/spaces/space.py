"""The joint search space: a model's compressible parts × a config's menus → Optuna parameters → Recipe.

A *unit* is one decision. Grouping sets how many there are: ``per_layer`` (a format per quantizable
layer, a keep ratio per prunable group), ``per_block`` (one per residual block / transformer layer,
and per layer outside blocks), ``per_region`` (one per named region) or ``global``. Keep ratios are
decided per unit *and kind* (attention heads, MLP / conv channels, residual width), because their
sensitivity differs. Rules fix or restrict choices by name pattern or region; a restricted layer
becomes a unit of its own. Practitioners' defaults (each can be switched off in ``space.defaults``
and overridden by a rule): the first layer and the output layers stay at 8 bits and unpruned, and a
vision-language projector stays at ≥ 8 bits and unpruned.

``suggest(trial)`` is define-by-run and cheap; replaying a finished trial's params with Optuna's
``FixedTrial`` gives the identical Recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from compsearch import __version__
from compsearch.errors import SpaceError
from compsearch.exports.onnx_layers import runs_on_integer_kernel
from compsearch.kernels.deploy import EMBEDDING, FAST_KERNELS, LINEAR, kernel_for
from compsearch.kernels.formats import FORMATS, get_format
from compsearch.kernels.quant import QuantSpec
from compsearch.recipes.schema import (
    CalibrationPlan,
    DistillPlan,
    FinetuneBudget,
    LayerPlan,
    Provenance,
    PrunePlan,
    Recipe,
)
from compsearch.spaces.config import Menu, Range, Rule, SpaceConfig, check_regions
from compsearch.spaces.discover import ModelInfo

FLOAT = "float"


# -- formats ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One quantization choice for a layer, named by a short label (``w4a8``, ``w4g128``, ``fp8``);
    the weight format's own label (see compsearch.kernels.formats)."""

    w_bits: int
    a_bits: int = 16
    granularity: str = "per_channel"
    group_size: int | None = None
    w_format: str = "int"
    method: str = "rtn"  # how the weight is rounded: rtn, gptq or awq (compsearch.kernels)

    @property
    def label(self) -> str:
        if self.w_bits == 16:
            return FLOAT
        base = get_format(self.w_format).label(self.spec())
        return base if self.method == "rtn" else f"{base}-{self.method}"

    def spec(self, activation_mode: str = "static") -> QuantSpec:
        return QuantSpec(self.w_bits, self.a_bits, self.granularity, self.group_size,
                         self.w_format, activation_mode)  # fmt: skip

    def plan(self) -> LayerPlan:
        if self.w_bits == 16:
            return LayerPlan()
        return LayerPlan(
            w_bits=self.w_bits,
            a_bits=self.a_bits if self.a_bits == 8 else None,
            granularity=self.granularity if self.granularity == "per_group" else None,
            group_size=self.group_size,
            w_format=None if self.w_format == "int" else self.w_format,
            method=None if self.method == "rtn" else self.method,
        )


def menu_formats(kind: str, menu: Menu, config: SpaceConfig, device: str,
                 runtime: str = "torch") -> list[Choice]:  # fmt: skip
    """The choices a layer of ``kind`` may take on ``device`` in ``runtime`` (``torch`` or
    ``onnxruntime``), from every format the config names: those a real kernel runs, and packed
    weight-only choices that save size (computed in float) — never int8 activations without a
    kernel."""
    found: list[Choice] = []
    for bits in menu.w_bits:
        if bits == 16:
            found.append(Choice(16))
            continue
        for name in config.w_formats:
            fmt = get_format(name)
            shapes = [(g, size) for g in menu.granularity if g in fmt.offered
                      for size in (menu.group_size if g == "per_group" else (None,))]  # fmt: skip
            for (granularity, group), a_bits, method in itertools.product(
                shapes, menu.a_bits, menu.method
            ):
                choice = Choice(bits, a_bits, granularity, group, name, method)
                spec = choice.spec(config.activation_mode)
                if fmt.check(spec) is not None:
                    continue
                if method != "rtn" and kind != LINEAR:  # GPTQ and AWQ take Linear layers
                    continue
                fast = kernel_for(kind, spec, device) in FAST_KERNELS
                if runtime == "onnxruntime":
                    fast = runs_on_integer_kernel(kind, spec)
                if a_bits == 8 and (kind == EMBEDDING or not fast):
                    continue
                if a_bits != 8 and not fmt.weight_only:
                    continue
                found.append(choice)
    unique = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


def fit(fmt: Choice, kind: str, fan_in: int, menu: list[Choice]) -> Choice:
    """``fmt`` as this layer can take it: int8 activations only where a kernel runs them, a group
    size only where it divides the fan-in."""
    if fmt in menu or fmt.w_bits == 16:
        return fmt
    if fmt.method != "rtn" and dataclasses.replace(fmt, method="rtn") in menu:
        return dataclasses.replace(fmt, method="rtn")  # GPTQ where the layer is not a Linear
    if fmt.w_format != "int":  # another format this layer does not offer: the int equivalent
        fmt = Choice(fmt.w_bits, fmt.a_bits)
    if fmt.granularity == "per_group" and fan_in % fmt.group_size:
        fmt = Choice(fmt.w_bits, fmt.a_bits)
    if fmt.a_bits == 8 and fmt not in menu:
        fmt = Choice(fmt.w_bits, 16, fmt.granularity, fmt.group_size)
    return fmt


# -- units -----------------------------------------------------------------------------------------


@dataclass
class QuantUnit:
    name: str
    layers: list[str]
    choices: list[Choice]


@dataclass
class KeepUnit:
    name: str  # "<unit>:<kind>"
    groups: list[str]
    keep: Range


@dataclass
class Space:
    """Build with :meth:`build`; then ``suggest(trial) -> Recipe``."""

    config: SpaceConfig
    info: ModelInfo
    task_name: str
    device: str
    finetune_steps: int
    quant_units: list[QuantUnit] = field(default_factory=list)
    keep_units: list[KeepUnit] = field(default_factory=list)
    drop_blocks: list[str] = field(default_factory=list)
    study: str | None = None
    layer_menus: dict[str, list[Choice]] = field(default_factory=dict)
    runtime: str = "torch"  # what latency is measured in: which int8 kernels exist

    @classmethod
    def build(
        cls,
        config: SpaceConfig,
        info: ModelInfo,
        task_name: str,
        device: str = "cpu",
        finetune_steps: int = 0,
        study: str | None = None,
        runtime: str = "torch",
    ) -> Space:
        check_regions(config, set(info.regions))
        space = cls(config, info, task_name, device, finetune_steps, study=study, runtime=runtime)
        space._quant_units(_rules(config, info))
        space._keep_units(_rules(config, info))
        space._depth(_rules(config, info))
        return space

    # -- construction

    def menu_of(self, name: str) -> Menu:
        region = self.info.region_of(name)
        return self.config.regions.get(region, self.config.menu) if region else self.config.menu

    def unit_of(self, name: str, grouping: str) -> str:
        if grouping == "per_layer":
            return name
        if grouping == "global":
            return "all"
        if grouping == "per_region":
            return self.info.region_of(name) or "rest"
        return self.info.block_of.get(name, name)

    def _quant_units(self, rules: list[Rule]) -> None:
        tied = {layer: sorted(names)[0] for names in self.info.ties for layer in names}
        units: dict[str, QuantUnit] = {}
        for name, kind in self.info.layers.items():
            menu = self.menu_of(name)
            formats = menu_formats(kind, menu, self.config, self.device, self.runtime)
            if name in tied:  # shared weights: one weight-only, round-to-nearest choice for all
                formats = [f for f in formats if f.a_bits == 16 and f.method == "rtn"]
            self.layer_menus[name] = formats
            restricted, rule = _apply_format_rules(name, formats, rules, self.info)
            if rule is not None and rule.source != "config":  # a default brings its own widths
                widened = dataclasses.replace(menu, w_bits=rule.w_bits)
                restricted = menu_formats(kind, widened, self.config, self.device, self.runtime)
                if name in tied:
                    restricted = [f for f in restricted if f.a_bits == 16 and f.method == "rtn"]
                self.layer_menus[name] = restricted
            if restricted is not formats:
                if not restricted:
                    raise SpaceError(
                        f"{rule.describe()}: expected it to leave at least one format for layer "
                        f"{name!r}, but it leaves none (menu: "
                        f"{', '.join(f.label for f in formats)}). Widen the rule or the menu."
                    )
                unit = tied.get(name, f"{name}")
                units.setdefault(unit, QuantUnit(unit, [], restricted)).layers.append(name)
                units[unit].choices = [f for f in units[unit].choices if f in restricted]
                continue
            if name in tied and tied[name] in units:  # every sharer's limits hold for the weight
                current = units[tied[name]]
                current.layers.append(name)
                current.choices = [f for f in current.choices if f in formats]
                continue
            unit = tied.get(name) or self.unit_of(name, menu.grouping)
            current = units.setdefault(unit, QuantUnit(unit, [], []))
            current.layers.append(name)
            current.choices += [f for f in formats if f not in current.choices]
        self.quant_units = list(units.values())

    def _keep_units(self, rules: list[Rule]) -> None:
        units: dict[str, KeepUnit] = {}
        for name, group in self.info.groups.items():
            if not group.prunable:
                continue
            menu = self.menu_of(group.name)
            keep, rule = _apply_keep_rules(group, menu.keep_ratio, rules, self.info)
            if keep.fixed and keep.low >= 1.0:
                continue
            if rule is not None:
                key = f"{name}:{group.kind}"
            else:
                key = f"{self.unit_of(group.name, menu.grouping)}:{group.kind}"
            units.setdefault(key, KeepUnit(key, [], keep)).groups.append(name)
        self.keep_units = list(units.values())

    def _depth(self, rules: list[Rule]) -> None:
        if not self.config.depth:
            return
        for block in self.info.blocks:
            if any(_rule_matches(r, block, self.info) and r.keep is not None for r in rules):
                continue
            self.drop_blocks.append(block)

    # -- sampling

    def suggest(self, trial) -> Recipe:
        layers: dict[str, LayerPlan] = {}
        for unit in self.quant_units:
            if len(unit.choices) == 1:
                chosen = unit.choices[0]
            else:
                label = trial.suggest_categorical(
                    f"fmt:{unit.name}", [f.label for f in unit.choices]
                )
                chosen = next(f for f in unit.choices if f.label == label)
            for layer in unit.layers:
                fitted = fit(chosen, self.info.layers[layer], self.info.fan_in[layer],
                             self.layer_menus[layer])  # fmt: skip
                plan = fitted.plan()
                if not plan.is_empty():
                    layers[layer] = plan
        for unit in self.keep_units:
            keep = _suggest_range(trial, f"keep:{unit.name}", unit.keep)
            if keep >= 1.0:
                continue
            for name in unit.groups:
                anchor = self.info.groups[name].name
                previous = layers.get(anchor, LayerPlan())
                layers[anchor] = LayerPlan(**{**previous.__dict__, "keep_ratio": round(keep, 6)})
        for block in self.drop_blocks:
            if trial.suggest_categorical(f"drop:{block}", [False, True]):
                layers[block] = LayerPlan(keep=False)
        c = self.config
        distill = DistillPlan(
            alpha=_suggest_range(trial, "alpha", c.alpha),
            temperature=_suggest_range(trial, "temperature", c.temperature),
            feature_weight=_suggest_range(trial, "feature_weight", c.feature_weight),
            attn_weight=_suggest_range(trial, "attn_weight", c.attn_weight),
        )
        finetune = FinetuneBudget(steps=self.finetune_steps, lr=_suggest_range(trial, "lr", c.lr))
        return Recipe(
            layers=dict(sorted(layers.items())),
            order=c.order,
            prune=PrunePlan(importance=c.importance, round_to=c.round_to, steps=c.prune_steps),
            calibration=CalibrationPlan(
                observer=c.observer,
                batches=c.calibration_batches,
                activation_mode=c.activation_mode,
            ),
            distill=distill,
            finetune=finetune,
            provenance=Provenance(
                task=self.task_name,
                model_fingerprint=self.info.fingerprint,
                compsearch_version=__version__,
                study=self.study,
                trial=getattr(trial, "number", None),
            ),
        )

    # -- helpers for the search

    @property
    def dimensions(self) -> int:
        searched = sum(1 for u in self.quant_units if len(u.choices) > 1)
        searched += sum(1 for u in self.keep_units if not u.keep.fixed)
        searched += len(self.drop_blocks)
        for value in (self.config.alpha, self.config.temperature, self.config.feature_weight,
                      self.config.attn_weight, self.config.lr):  # fmt: skip
            searched += not value.fixed
        return searched

    def uniform_params(self, label: str, keep: float = 1.0) -> dict[str, object]:
        """Parameters of a uniform recipe — every unit the format closest to ``label``, every keep
        ratio ``keep`` (clipped to its range) — for enqueuing baselines."""
        target = parse_label(label)
        params: dict[str, object] = {}
        for unit in self.quant_units:
            if len(unit.choices) > 1:
                params[f"fmt:{unit.name}"] = _nearest(target, unit.choices).label
        for unit in self.keep_units:
            if unit.keep.fixed:
                continue
            value = min(max(keep, unit.keep.low), unit.keep.high)
            if unit.keep.step:
                steps = round((value - unit.keep.low) / unit.keep.step)
                value = unit.keep.low + steps * unit.keep.step
            params[f"keep:{unit.name}"] = round(value, 10)
        for block in self.drop_blocks:
            params[f"drop:{block}"] = False
        c = self.config
        for name, value in (("alpha", c.alpha), ("temperature", c.temperature),
                            ("feature_weight", c.feature_weight), ("attn_weight", c.attn_weight),
                            ("lr", c.lr)):  # fmt: skip
            if not value.fixed:
                params[name] = _middle(value)
        return params


def parse_label(label: str) -> Choice:
    """A menu label back to its choice. Formats other than ``int`` label their one offered choice
    by their name: 8-bit weights with int8-or-narrower activations (like fp8)."""
    if label == FLOAT:
        return Choice(16)
    if label in FORMATS and label != "int":
        return Choice(8, 8, w_format=label)
    match = re.fullmatch(r"w(\d)(?:g(\d+))?(a8)?(?:-(gptq|awq))?", label)
    if match is None:
        raise SpaceError(
            f"expected a format label like 'w4', 'w8a8', 'w4g128', 'w4g32-gptq' or 'float', got "
            f"{label!r}."
        )
    group = int(match.group(2)) if match.group(2) else None
    return Choice(int(match.group(1)), 8 if match.group(3) else 16,
                  "per_group" if group else "per_channel", group, "int",
                  match.group(4) or "rtn")  # fmt: skip


def _nearest(target: Choice, choices: list[Choice]) -> Choice:
    """The choice closest to ``target``: same activation bits first, then the nearest width
    (ties towards more bits), then the same granularity."""
    return min(
        choices,
        key=lambda f: (
            f.a_bits != target.a_bits,
            abs(f.w_bits - target.w_bits),
            f.w_bits < target.w_bits,
            f.granularity != target.granularity,
            f.w_format != target.w_format,
            f.method != target.method,
        ),
    )


def _middle(value: Range) -> float:
    if value.log:
        return float((value.low * value.high) ** 0.5)
    return (value.low + value.high) / 2


def _suggest_range(trial, name: str, value: Range) -> float:
    if value.fixed:
        return value.low
    if value.step:
        return trial.suggest_float(name, value.low, value.high, step=value.step)
    return trial.suggest_float(name, value.low, value.high, log=value.log)


# -- rules -----------------------------------------------------------------------------------------


def _rules(config: SpaceConfig, info: ModelInfo) -> list[Rule]:
    """Config rules first (they win), then the practitioners' defaults that are switched on."""
    rules = list(config.rules)
    if config.defaults.get("first_layer") and info.first_layer:
        rules.append(Rule(-1, info.first_layer, None, w_bits=(8,), keep_ratio=Range(1.0, 1.0),
                          source=f"default: the first layer ({info.first_layer}) stays at 8 bits, "
                                 "unpruned"))  # fmt: skip
    for layer in info.output_layers if config.defaults.get("output_layer") else []:
        rules.append(Rule(-1, layer, None, w_bits=(8,), keep_ratio=Range(1.0, 1.0),
                          source=f"default: the output layer ({layer}) stays at 8 bits"))  # fmt: skip
    if config.defaults.get("projector") and "projector" in info.regions:
        rules.append(Rule(-1, None, "projector", w_bits=(8, 16), keep_ratio=Range(1.0, 1.0),
                          keep=True, source="default: the projector stays at >= 8 bits, "
                                            "unpruned"))  # fmt: skip
    return rules


def _rule_matches(rule: Rule, name: str, info: ModelInfo) -> bool:
    if rule.region is not None:
        return info.region_of(name) == rule.region
    if rule.match.startswith("re:"):
        return re.fullmatch(rule.match[3:], name) is not None
    return rule.match == name


def _apply_format_rules(name, formats, rules, info) -> tuple[list[Choice], Rule | None]:
    for rule in rules:
        if (rule.w_bits or rule.a_bits) and _rule_matches(rule, name, info):
            kept = [
                f
                for f in formats
                if (rule.w_bits is None or f.w_bits in rule.w_bits)
                and (rule.a_bits is None or f.a_bits in rule.a_bits)
            ]
            return kept, rule
    return formats, None


def _apply_keep_rules(group, keep: Range, rules, info) -> tuple[Range, Rule | None]:
    for rule in rules:
        if rule.keep_ratio is None:
            continue
        if rule.region is not None:
            hit = any(info.region_of(layer) == rule.region for layer in group.layers)
        else:
            hit = _rule_matches(rule, group.name, info)
        if hit:
            return rule.keep_ratio, rule
    return keep, None
