"""What to prune: kept counts, the replayable record, the report, and plans from a recipe.

See :mod:`compsearch.kernels.prune`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from compsearch.errors import KernelError
from compsearch.kernels._prune_groups import Analysis, _sample
from compsearch.recipes.schema import REGEX_PREFIX, Recipe

# -- what to prune ---------------------------------------------------------------------------------


def kept_count(size: int, keep_ratio: float, round_to: int, heads: bool = False) -> int:
    """Units kept: ``keep_ratio · size`` rounded to a multiple of ``round_to`` when the group is
    at least twice that wide (heads round to whole heads); never zero, never more than ``size``."""
    if not 0.0 < keep_ratio <= 1.0:
        raise KernelError(f"keep_ratio: expected a number in (0, 1], but got {keep_ratio!r}.")
    wanted = keep_ratio * size
    if not heads and round_to > 1 and size >= 2 * round_to:
        count = max(round_to, round_to * round(wanted / round_to))
    else:
        count = max(1, round(wanted))
    return min(count, size)


@dataclass
class PruneRecord:
    """Plain-data history of pruning: dropped blocks and, per group, the kept unit indices."""

    dropped_blocks: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "dropped_blocks": list(self.dropped_blocks), "groups": self.groups}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneRecord:
        if not isinstance(data, dict) or data.get("version") != 1:
            raise KernelError(
                f"expected a pruning record with version 1, but got {str(data)[:80]!r}."
            )
        return cls(list(data.get("dropped_blocks", [])), dict(data.get("groups", {})))

    def then(self, later: PruneRecord) -> PruneRecord:
        """This record followed by ``later`` (progressive pruning), as one record on the original."""
        groups = {name: dict(entry) for name, entry in self.groups.items()}
        for name, entry in later.groups.items():
            if name in groups:
                earlier = groups[name]["kept"]
                groups[name] = {**entry, "size": groups[name]["size"],
                                "kept": [earlier[i] for i in entry["kept"]]}  # fmt: skip
            else:
                groups[name] = dict(entry)
        return PruneRecord(self.dropped_blocks + later.dropped_blocks, groups)

    @property
    def is_empty(self) -> bool:
        return not self.dropped_blocks and not self.groups


@dataclass
class PruneReport:
    """What was pruned (kept / total per group), which blocks were dropped, what was skipped and why."""

    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)
    dropped_blocks: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # weight tensors (2-D or more) that no prune group reaches, with why
    untouched: dict[str, str] = field(default_factory=dict)
    # groups the analysis found and cannot prune (whatever the recipe asked), with why
    blocked: dict[str, str] = field(default_factory=dict)


def plan_from_recipe(
    analysis: Analysis, recipe: Recipe, dropped: Iterable[str] = ()
) -> tuple[dict[str, float], list[str], dict[str, str]]:
    """Keep ratio per group and blocks to drop, as the recipe asks; errors for impossible asks.

    Returns ``(keep_ratios, blocks, skipped)``: ``skipped`` holds groups a ``re:`` rule asked to
    prune that cannot be, with the reason. An exact key that cannot be honoured is an error.
    """
    ratios: dict[str, float] = {}
    skipped: dict[str, str] = {}
    gone = tuple(f"{name}." for name in dropped)
    exact = {
        k: p
        for k, p in recipe.layers.items()
        if not k.startswith(REGEX_PREFIX) and not k.startswith(gone) and k not in dropped
    }
    for key, plan in exact.items():
        if plan.keep_ratio is not None and plan.keep_ratio < 1.0:
            _check_exact_keep(analysis, key)
        if plan.keep is False and key not in analysis.blocks:
            raise KernelError(
                f"layer {key!r}: expected a residual block that can be dropped (keep: false), but "
                f"it is not one. Droppable blocks: {_sample(analysis.blocks)}."
            )
    for name, group in analysis.groups.items():
        ratio = recipe.plan_for(group.name).keep_ratio
        if ratio is None or ratio >= 1.0:
            continue
        if group.prunable:
            ratios[name] = ratio
        else:
            skipped[name] = group.reason
    blocks = [name for name in analysis.blocks if recipe.plan_for(name).keep is False]
    return ratios, blocks, skipped


def _check_exact_keep(analysis: Analysis, key: str) -> None:
    group = analysis.groups.get(key)
    if key in analysis.output_layers:
        raise KernelError(
            f"layer {key!r}: expected a layer whose outputs can be pruned, but it is an output "
            "layer (its channels are the model's output). Remove its keep_ratio."
        )
    if group is None:
        owner = analysis.group_of_layer(key)
        if owner is not None:
            raise KernelError(
                f"layer {key!r}: its channels are coupled with {len(owner.layers) - 1} other "
                f"layer(s) in the group anchored at {owner.name!r}; expected the keep_ratio on "
                f"{owner.name!r}."
            )
        raise KernelError(
            f"layer {key!r}: expected the anchor of a prunable group, but no group is anchored "
            f"there. Groups: {_sample(analysis.groups)}."
        )
    if not group.prunable:
        raise KernelError(f"layer {key!r}: this group cannot be pruned ({group.reason}).")
