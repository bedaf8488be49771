"""The Recipe: the complete, serializable description of one compression.

A recipe holds per-layer plans keyed by the module's fully qualified name (or a ``re:`` pattern), the
pruning, calibration and distillation plans, the fine-tune budget and provenance. Everything is plain
data: ``Recipe.from_dict(recipe.to_dict()) == recipe``. Parsing is strict; every error names the field,
what is allowed and what was received.

How layer keys resolve (see :meth:`Recipe.plan_for`): an exact name applies first, then ``re:`` keys
in file order (``re.fullmatch`` on the name); for each field the first plan that sets it wins. So
``{"re:.*": {w_bits: 4}, "fc": {w_bits: 8}}`` gives ``fc`` 8 bits and every other layer 4.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from compsearch._schema import Schema
from compsearch.errors import RecipeError

RECIPE_VERSION = 1
W_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
A_BITS = (8, 16)
GROUP_SIZES = (32, 64, 128)
ROUNDING_METHODS = ("rtn", "gptq", "awq")
FLOAT_BITS = 16  # w_bits / a_bits of 16 mean "leave in float"
REGEX_PREFIX = "re:"

_S = Schema(RecipeError, fix="See the recipe format in compsearch/recipes/schema.py.")


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer. ``None`` means "not set here" (another key or the default decides).

    ``w_bits`` 2..8 quantize the weight to that many bits (16 leaves it in float); ``a_bits`` 8
    quantizes the layer's input activations (16 leaves them in float); ``granularity`` is
    ``per_channel`` or ``per_group`` (then ``group_size`` input features share one scale);
    ``w_format`` names a registered weight format: ``int`` (integer levels), ``fp8`` (float8
    e4m3, with ``w_bits: 8``) or one of your own (compsearch.kernels.formats);
    ``keep_ratio`` is the fraction of output channels / neurons / heads that pruning keeps;
    ``keep: false`` on a residual block or transformer layer removes it (depth pruning);
    ``method`` is how the weight is rounded: ``rtn`` (round to nearest, the default), ``gptq``
    (column by column with error compensation on calibration inputs, compsearch.kernels.gptq) or
    ``awq`` (activation-aware input-channel scaling, then round to nearest, compsearch.kernels.awq);
    ``smooth`` (0..1, with ``a_bits: 8``) is SmoothQuant's migration strength α: activation outliers
    moved into the weight through the normalization layer that feeds the layer
    (compsearch.kernels.smooth).
    """

    w_bits: int | None = None
    a_bits: int | None = None
    granularity: str | None = None
    group_size: int | None = None
    w_format: str | None = None
    keep_ratio: float | None = None
    keep: bool | None = None
    method: str | None = None
    smooth: float | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None and self.granularity is None:
            object.__setattr__(self, "granularity", "per_group")

    def merged_over(self, other: LayerPlan) -> LayerPlan:
        """This plan, with fields it leaves unset taken from ``other``."""
        values = {
            f.name: getattr(other, f.name)
            if getattr(self, f.name) is None
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return LayerPlan(**values)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "layer") -> LayerPlan:
        values = _S.record(data, path, _LAYER_FIELDS)
        plan = cls(**values)
        if plan.granularity == "per_group" and plan.group_size is None:
            raise RecipeError(
                f"{path}.group_size: expected one of {', '.join(map(str, GROUP_SIZES))} because "
                "granularity is 'per_group', but it is missing. Add group_size or use per_channel."
            )
        if plan.group_size is not None and plan.granularity == "per_channel":
            raise RecipeError(
                f"{path}.group_size: expected no group_size with granularity 'per_channel', but got "
                f"{plan.group_size!r}. Remove group_size or set granularity: per_group."
            )
        return plan


_LAYER_FIELDS = {
    "w_bits": _S.optional(_S.one_of(W_BITS, note="16 keeps the weight in float")),
    "a_bits": _S.optional(_S.one_of(A_BITS, note="16 keeps activations in float")),
    "granularity": _S.optional(_S.one_of(("per_channel", "per_group"))),
    "group_size": _S.optional(_S.one_of(GROUP_SIZES)),
    # the name of a registered weight format; which names exist, and what each accepts, is the
    # kernels' to say (compsearch.kernels.formats), checked before any work by pipeline.checked
    "w_format": _S.optional(_S.string(r"[A-Za-z][A-Za-z0-9_-]{0,39}", "a weight format name")),
    "keep_ratio": _S.optional(_S.number(0.0, 1.0, lo_open=True)),
    "keep": _S.optional(_S.boolean()),
    "method": _S.optional(_S.one_of(ROUNDING_METHODS, note="how the weight is rounded")),
    "smooth": _S.optional(_S.number(0.0, 1.0)),
}


@dataclass(frozen=True)
class PrunePlan:
    """How channels are ranked and rounded, and in how many steps pruning is applied."""

    importance: str = "l1"
    round_to: int = 8
    steps: int = 1


@dataclass(frozen=True)
class CalibrationPlan:
    """How quantization ranges are found before and after fine-tuning.

    ``observer`` picks activation ranges (``minmax``, ``percentile``, or ``mse``: the clipping that
    minimizes quantization error) and, with ``mse``, searches weight clipping too.
    ``activation_mode`` is ``static`` (one calibrated scale per tensor) or ``dynamic`` (a scale per
    token, computed at run time). ``learnable_scales`` trains the step sizes (LSQ) during fine-tuning.
    """

    observer: str = "minmax"
    batches: int = 8
    percentile: float = 99.99
    activation_mode: str = "static"
    learnable_scales: bool = False


@dataclass(frozen=True)
class DistillPlan:
    """Weights of the distillation losses.

    ``alpha`` mixes logit distillation against the task loss (``alpha * kd + (1 - alpha) * task``);
    ``feature_weight`` and ``attn_weight`` add feature (hidden state) and attention-map terms;
    ``feature_layers`` names the modules whose outputs feature distillation matches (empty: the
    task's default choice).
    """

    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 0.0
    attn_weight: float = 0.0
    feature_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinetuneBudget:
    """The fine-tune run: optimizer steps, peak learning rate and schedule.

    Embedding tables are frozen unless ``train_embeddings`` (a short fine-tune touches few of their
    rows, and their dense optimizer update costs as much as the rest of a small encoder's step).
    """

    steps: int = 0
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int | None = None
    seed: int = 0
    train_embeddings: bool = False


@dataclass(frozen=True)
class Provenance:
    """Where a recipe came from and what was measured for it."""

    task: str | None = None
    model_fingerprint: str | None = None
    compsearch_version: str | None = None
    study: str | None = None
    trial: int | None = None
    measured: Mapping[str, float] = field(default_factory=dict)
    #: values that came from a prediction (the latency lookup table), with the table's checked error
    predicted: Mapping[str, float] = field(default_factory=dict)
    latency_source: str | None = None  # "measured" or "predicted"
    #: exported with ``--allow-infeasible`` from a study with no feasible point: each bound the
    #: trial broke and by how much (its constraint value, > 0); empty for a feasible recipe
    infeasible: Mapping[str, float] = field(default_factory=dict)


_PRUNE_FIELDS = {
    "importance": _S.one_of(("l1", "l2", "taylor", "random")),
    "round_to": _S.integer(1, 1024),
    "steps": _S.integer(1, 100),
}
_CALIBRATION_FIELDS = {
    "observer": _S.one_of(("minmax", "percentile", "mse")),
    "batches": _S.integer(1, 100_000),
    "percentile": _S.number(50.0, 100.0, lo_open=True),
    "activation_mode": _S.one_of(("static", "dynamic")),
    "learnable_scales": _S.boolean(),
}
_DISTILL_FIELDS = {
    "alpha": _S.number(0.0, 1.0),
    "temperature": _S.number(0.0, None, lo_open=True),
    "feature_weight": _S.number(0.0, None),
    "attn_weight": _S.number(0.0, None),
    "feature_layers": _S.list_of(_S.string(what="a module name")),
}
_FINETUNE_FIELDS = {
    "steps": _S.integer(0, None),
    "lr": _S.number(0.0, 1.0, lo_open=True),
    "warmup_ratio": _S.number(0.0, 1.0, hi_open=True),
    "weight_decay": _S.number(0.0, None),
    "max_grad_norm": _S.number(0.0, None, lo_open=True),
    "batch_size": _S.optional(_S.integer(1, None)),
    "seed": _S.integer(0, 2**32 - 1),
    "train_embeddings": _S.boolean(),
}


def _measured(value: Any, path: str) -> dict[str, float]:
    data = _S.mapping(value, path)
    return {key: _S.number()(item, f"{path}.{key}") for key, item in data.items()}


_PROVENANCE_FIELDS = {
    "task": _S.optional(_S.string()),
    "model_fingerprint": _S.optional(_S.string(r"sha256:[0-9a-f]{16,64}", "'sha256:<hex>'")),
    "compsearch_version": _S.optional(_S.string()),
    "study": _S.optional(_S.string()),
    "trial": _S.optional(_S.integer(0, None)),
    "measured": _measured,
    "predicted": _measured,
    "latency_source": _S.optional(_S.one_of(("measured", "predicted"))),
    "infeasible": _measured,
}

ORDERS = ("prune_first", "quantize_first")


@dataclass(frozen=True)
class Recipe:
    """One compression, replayable on a fresh teacher. See the module docstring for key resolution."""

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    order: str = "prune_first"
    prune: PrunePlan = field(default_factory=PrunePlan)
    calibration: CalibrationPlan = field(default_factory=CalibrationPlan)
    distill: DistillPlan = field(default_factory=DistillPlan)
    finetune: FinetuneBudget = field(default_factory=FinetuneBudget)
    provenance: Provenance = field(default_factory=Provenance)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        for key in self.layers:
            _check_layer_key(key, f"recipe.layers[{key!r}]")

    # -- key resolution ----------------------------------------------------------------------------

    def plan_for(self, name: str) -> LayerPlan:
        """The plan for module ``name``: exact key first, then ``re:`` keys in order, field-wise."""
        plan = self.layers.get(name, LayerPlan())
        for key, other in self.layers.items():
            if key.startswith(REGEX_PREFIX) and re.fullmatch(key[len(REGEX_PREFIX) :], name):
                plan = plan.merged_over(other)
        return plan

    def resolve(self, names: Iterable[str]) -> dict[str, LayerPlan]:
        """Plans for every name that some key sets a field for."""
        plans = {name: self.plan_for(name) for name in names}
        return {name: plan for name, plan in plans.items() if not plan.is_empty()}

    # -- plain data --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        provenance = dataclasses.asdict(self.provenance)
        provenance["measured"] = dict(self.provenance.measured)
        provenance["predicted"] = dict(self.provenance.predicted)
        distill = dataclasses.asdict(self.distill)
        distill["feature_layers"] = list(self.distill.feature_layers)
        return {
            "version": self.version,
            "layers": {key: plan.to_dict() for key, plan in self.layers.items()},
            "order": self.order,
            "prune": dataclasses.asdict(self.prune),
            "calibration": dataclasses.asdict(self.calibration),
            "distill": distill,
            "finetune": dataclasses.asdict(self.finetune),
            "provenance": {k: v for k, v in provenance.items() if v not in (None, {})},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        fields = {
            "version": _version,
            "layers": _layers,
            "order": _S.one_of(ORDERS),
            "prune": lambda v, p: PrunePlan(**_S.record(v, p, _PRUNE_FIELDS)),
            "calibration": lambda v, p: CalibrationPlan(**_S.record(v, p, _CALIBRATION_FIELDS)),
            "distill": lambda v, p: DistillPlan(**_S.record(v, p, _DISTILL_FIELDS)),
            "finetune": lambda v, p: FinetuneBudget(**_S.record(v, p, _FINETUNE_FIELDS)),
            "provenance": lambda v, p: Provenance(**_S.record(v, p, _PROVENANCE_FIELDS)),
        }
        return cls(**_S.record(data, "recipe", fields, required=("version",)))


def _version(value: Any, path: str) -> int:
    if value != RECIPE_VERSION or isinstance(value, bool):
        raise RecipeError(
            f"{path}: expected {RECIPE_VERSION} (the recipe format this compsearch reads), but got "
            f"{value!r}. Re-export the recipe with this version of compsearch."
        )
    return RECIPE_VERSION


def _layers(value: Any, path: str) -> dict[str, LayerPlan]:
    data = _S.mapping(value, path)
    plans = {}
    for key, plan in data.items():
        _check_layer_key(key, f"{path}[{key!r}]")
        plans[key] = LayerPlan.from_dict({} if plan is None else plan, f"{path}[{key!r}]")
    return plans


def _check_layer_key(key: str, path: str) -> None:
    if not isinstance(key, str) or not key:
        raise RecipeError(
            f"{path}: expected a module's fully qualified name (e.g. 'layer1.0.conv1') or a "
            f"'re:<pattern>' rule, but got {key!r}."
        )
    if key.startswith(REGEX_PREFIX):
        try:
            re.compile(key[len(REGEX_PREFIX) :])
        except re.error as error:
            raise RecipeError(
                f"{path}: expected a valid regular expression after 're:', but got {key!r} ({error})."
            ) from None
