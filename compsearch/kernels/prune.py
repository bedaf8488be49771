"""Structured pruning that physically shrinks the model: channels, attention heads and whole blocks.

1. :func:`analyze` traces one forward (:mod:`compsearch.kernels.graph`) and returns the model's
   *groups*: sets of coupled channels that must be pruned together (conv → norm → conv chains, the
   residual stream, MLP neurons, attention heads — a key/value head with the query heads that share
   it), each named by its *anchor* layer, plus the residual *blocks* that can be dropped whole.
2. :func:`prune_` reads a keep ratio per group from the recipe (the plan of the group's anchor),
   ranks units by importance (L1, L2, first-order Taylor, random) summed over the group's members,
   rounds the kept count (multiples of ``round_to`` where the group is wide enough), and replaces
   every tensor by its kept slice. Output layers are never pruned; groups that cannot be pruned
   safely are reported with the reason, never dropped silently.
3. The kept indices are a :class:`PruneRecord` — plain data. :func:`replay_` applies a record to a
   fresh model, rebuilding the same architecture so a saved state dict loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels._modules import replace_module
from compsearch.kernels.graph import Member, Space, Trace, trace_model
from compsearch.recipes.schema import REGEX_PREFIX, Recipe

IMPORTANCES = ("l1", "l2", "taylor", "random")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")

Run = Callable[[nn.Module], Any]


# -- analysis --------------------------------------------------------------------------------------


@dataclass
class Group:
    """Coupled units pruned by one decision. Each member covers ``size`` units of ``width`` entries."""

    name: str
    kind: str  # "channels", "stream" (a residual stream) or "heads"
    size: int
    members: list[tuple[Member, int]]
    layers: list[str]
    reason: str | None = None  # why it cannot be pruned; None if it can
    attention: str | None = None
    q_per_kv: int = 1
    head_dim: int = 1

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def indices(self, member: Member, width: int, units: torch.Tensor) -> torch.Tensor:
        span = torch.arange(width)
        return (member.offset + units.unsqueeze(1) * width + span).reshape(-1)


@dataclass
class Analysis:
    groups: dict[str, Group]
    blocks: dict[str, int]  # droppable block -> returned tuple length (0: a tensor)
    output_layers: set[str]
    trace: Trace = field(repr=False)

    def group_of_layer(self, layer: str) -> Group | None:
        for group in self.groups.values():
            if layer in group.layers:
                return group
        return None


def analyze(model: nn.Module, run: Run) -> Analysis:
    """Find the prunable groups and droppable blocks of ``model`` from one traced forward."""
    trace = trace_model(model, run)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups: dict[str, Group] = {}
    claimed: set[int] = set()
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for attention in trace.attentions:
        group = _head_group(attention, order)
        for space in [s.space for s in attention.q + attention.kv] + [attention.out_space]:
            claimed.add(space.find().id)
        groups[_unique(group.name, groups)] = group
    outputs: set[str] = set()
    seen: set[int] = set()
    for space in trace.spaces:
        for leaf, _ in space.leaves():
            root = leaf.find()
            if root.id in seen or root.id in claimed:
                continue
            seen.add(root.id)
            group = _channel_group(root, trace, order, embeddings)
            if group is None:
                continue
            if root.pinned == "reaches the model output":
                outputs.update(_producers(root, trace))
            groups[_unique(group.name, groups)] = group
    blocks = {b.name: b.returns_tuple for b in trace.blocks}
    return Analysis(groups, blocks, outputs, trace)


def _unique(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    count = 2
    while f"{name}#{count}" in taken:
        count += 1
    return f"{name}#{count}"


def _producers(root: Space, trace: Trace) -> list[str]:
    return sorted({trace.module_of_key[m.key] for m in root.all_members() if m.role == "out"})


def _channel_group(
    root: Space, trace: Trace, order: dict[str, int], embeddings: set[str]
) -> Group | None:
    members = root.all_members()
    if not members:
        return None
    producers = _producers(root, trace)
    if not producers:
        return None  # channels that only come in (the model's input): not a decision to make
    layers = sorted({trace.module_of_key[m.key] for m in members}, key=lambda n: order.get(n, 0))
    # a hidden width is named after its embedding where there is one, else the first producer
    anchor = min(producers, key=lambda n: (n not in embeddings, order.get(n, 0)))
    reason = None
    if root.blocked:
        reason = "; ".join(root.blocked)
    elif root.pinned:
        reason = root.pinned
    elif root.splits:
        reason = "split into heads that no output projection reads"
    elif root.size < 2:
        reason = "a single channel"
    kind = "stream" if len(producers) > 1 and root.adds else "channels"
    return Group(anchor, kind, root.size, [(m, 1) for m in members], layers, reason)


def _head_group(attention, order: dict[str, int]) -> Group:
    g = attention.q_heads // attention.kv_heads
    width_q = g * attention.head_dim
    members: list[tuple[Member, int]] = []
    reasons = []
    for split, width in [(s, width_q) for s in attention.q] + [
        (s, attention.head_dim) for s in attention.kv
    ]:
        space = split.space.find()
        members += [(m, width) for m in space.all_members()]
        reasons += space.blocked + ([space.pinned] if space.pinned else [])
    out = attention.out_space.find()
    members += [(m, width_q) for m in out.all_members()]
    reasons += out.blocked + ([out.pinned] if out.pinned else [])
    if attention.kv_heads < 2:
        reasons.append("a single key/value head")
    layers = sorted({m.key.rpartition(".")[0] for m, _ in members}, key=lambda n: order.get(n, 0))
    return Group(
        attention.module or attention.out_layer,
        "heads",
        attention.kv_heads,
        members,
        layers,
        "; ".join(reasons) or None,
        attention=attention.module,
        q_per_kv=g,
        head_dim=attention.head_dim,
    )


# -- importance ------------------------------------------------------------------------------------


def importance(
    model: nn.Module,
    group: Group,
    method: str = "l1",
    seed: int = 0,
    grads: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Score of each unit of ``group`` (higher = more important), summed over its members after
    each member's scores are divided by their mean (so no layer dominates by scale alone)."""
    if method not in IMPORTANCES:
        raise KernelError(f"importance: expected one of {IMPORTANCES}, but got {method!r}.")
    if method == "random":
        generator = torch.Generator().manual_seed(seed + sum(map(ord, group.name)))
        return torch.rand(group.size, generator=generator)
    tensors = _tensor_table(model)
    total = torch.zeros(group.size, dtype=torch.float64)
    for member, width in group.members:
        weight = tensors[member.key].detach()
        if method == "taylor":
            if grads is None or member.key not in grads:
                continue
            weight = weight * grads[member.key]
        values = weight.narrow(member.dim, member.offset, group.size * width).movedim(member.dim, 0)
        values = values.reshape(group.size, -1).double()
        scores = values.abs().sum(1) if method in ("l1", "taylor") else values.pow(2).sum(1).sqrt()
        mean = scores.mean()
        if mean > 0:
            total += scores / mean
    return total


def taylor_gradients(
    model: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Gradients of ``loss`` accumulated over ``batches``, by state-dict key (first-order Taylor)."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    for param in params.values():
        param.grad = None
    for batch in batches:
        loss(model, batch).backward()
    model.train(was_training)
    grads = {key: p.grad.detach().clone() for key, p in params.items() if p.grad is not None}
    for param in params.values():
        param.grad = None
    return grads


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


def _sample(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "") if names else "none"


# -- doing it --------------------------------------------------------------------------------------


class SkipBlock(nn.Module):
    """Stands in for a dropped residual block: returns its input (in the block's output form).

    :func:`skip_block` makes it a subclass of the dropped block's class too, so code that finds
    layers by type (e.g. to record hidden states) still finds it; it has no parameters.
    """

    returns_tuple = 0

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.returns_tuple:
            return (hidden,) + (None,) * (self.returns_tuple - 1)
        return hidden

    def extra_repr(self) -> str:
        return "dropped block: returns its input"


def skip_block(original: nn.Module, returns_tuple: int) -> SkipBlock:
    cls = type(f"Skipped{type(original).__name__}", (SkipBlock, type(original)), {})
    block = object.__new__(cls)
    nn.Module.__init__(block)
    for key, value in original.__dict__.items():  # plain attributes (layer_idx, attention_type)
        if not key.startswith("_") and isinstance(value, (int, float, str, bool, type(None))):
            setattr(block, key, value)
    block.returns_tuple = returns_tuple
    return block


def drop_blocks_(model: nn.Module, blocks: dict[str, int], names: Iterable[str]) -> list[str]:
    dropped = []
    names = list(names)
    for name in names:
        if name not in blocks:
            raise KernelError(
                f"block {name!r}: expected a residual block that can be dropped, but it is not one. "
                f"Droppable blocks: {_sample(blocks)}."
            )
    for name in names:
        original = model.get_submodule(name)
        replace_module(model, original, skip_block(original, blocks[name]))
        dropped.append(name)
    return dropped


def prune_(
    model: nn.Module,
    plans: Recipe | dict,
    run: Run,
    method: str = "l1",
    round_to: int = 8,
    seed: int = 0,
    grads: dict[str, torch.Tensor] | None = None,
) -> tuple[PruneRecord, PruneReport]:
    """Prune ``model`` in place as ``plans`` (a Recipe or ``{layer key: LayerPlan}``) asks.

    Depth first (blocks with ``keep: false`` become :class:`SkipBlock`), then channels and heads.
    Everything is checked before the model changes. ``grads`` (from :func:`taylor_gradients`) are
    required for ``method="taylor"``.
    """
    recipe = plans if isinstance(plans, Recipe) else Recipe(layers=dict(plans))
    if method not in IMPORTANCES:
        raise KernelError(f"importance: expected one of {IMPORTANCES}, but got {method!r}.")
    if method == "taylor" and grads is None:
        raise KernelError(
            "importance 'taylor' expected gradients, but none were given. Compute them with "
            "compsearch.kernels.prune.taylor_gradients(model, loss, batches)."
        )
    analysis = analyze(model, run)
    ratios, blocks, skipped = plan_from_recipe(analysis, recipe)
    report = PruneReport(skipped=skipped)
    record = PruneRecord()
    if blocks:
        record.dropped_blocks = drop_blocks_(model, analysis.blocks, blocks)
        report.dropped_blocks = list(record.dropped_blocks)
        analysis = analyze(model, run)
        ratios, _, skipped = plan_from_recipe(analysis, recipe, record.dropped_blocks)
        report.skipped = skipped
    decisions = {}
    for name, ratio in ratios.items():
        group = analysis.groups[name]
        count = kept_count(group.size, ratio, round_to, heads=group.kind == "heads")
        scores = importance(model, group, method, seed, grads)
        kept = torch.sort(torch.topk(scores, count).indices).values
        decisions[name] = kept
        record.groups[name] = {"kind": group.kind, "size": group.size, "kept": kept.tolist()}
        report.pruned[name] = (count, group.size)
    _apply(model, analysis, decisions, run)
    return record, report


def replay_(model: nn.Module, record: PruneRecord, run: Run) -> None:
    """Apply ``record`` to a fresh model of the architecture it was made on."""
    if record.dropped_blocks:
        analysis = analyze(model, run)
        drop_blocks_(model, analysis.blocks, record.dropped_blocks)
    if not record.groups:
        return
    analysis = analyze(model, run)
    decisions = {}
    for name, entry in record.groups.items():
        group = analysis.groups.get(name)
        if group is None or group.size != entry["size"]:
            found = "no such group" if group is None else f"size {group.size}"
            raise KernelError(
                f"pruning record: expected group {name!r} of size {entry['size']}, but the model "
                f"has {found}. Replay the record on the architecture it was made for."
            )
        kept = torch.tensor(entry["kept"], dtype=torch.long)
        if len(kept) == 0 or int(kept.max()) >= group.size or int(kept.min()) < 0:
            raise KernelError(f"pruning record: group {name!r} has kept indices out of range.")
        decisions[name] = kept
    _apply(model, analysis, decisions, run)


def _apply(model: nn.Module, analysis: Analysis, decisions: dict[str, torch.Tensor], run: Run):
    tensors = _tensor_table(model)
    keep: dict[tuple[str, int], set[int]] = {}
    for name, kept in decisions.items():
        group = analysis.groups[name]
        removed = torch.ones(group.size, dtype=torch.bool)
        removed[kept] = False
        units = torch.nonzero(removed).reshape(-1)
        for member, width in group.members:
            index = (member.key, member.dim)
            if index not in keep:
                keep[index] = set(range(tensors[member.key].shape[member.dim]))
            keep[index] -= set(group.indices(member, width, units).tolist())
    changed_ids: dict[int, torch.Tensor] = {}
    by_tensor: dict[str, list[tuple[int, list[int]]]] = {}
    for (key, dim), kept in keep.items():
        by_tensor.setdefault(key, []).append((dim, sorted(kept)))
    for key, cuts in by_tensor.items():
        tensor = tensors[key]
        new = tensor.detach()
        for dim, kept in cuts:
            new = new.index_select(dim, torch.tensor(kept, dtype=torch.long, device=new.device))
        changed_ids[id(tensor)] = new.contiguous()
    _replace_tensors(model, changed_ids)
    _sync_attributes(model, analysis, decisions)
    try:
        with torch.no_grad():
            run(model)
    except Exception as error:  # a bug in the analysis must not pass silently
        raise KernelError(
            f"the pruned model no longer runs ({type(error).__name__}: {error}). This is a bug in "
            "the dependency analysis for this architecture; please report it."
        ) from error


def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    table = dict(model.named_parameters(remove_duplicate=False))
    table.update(dict(model.named_buffers(remove_duplicate=False)))
    return table


def _replace_tensors(model: nn.Module, changed: dict[int, torch.Tensor]) -> None:
    """Swap every registration of a changed tensor (tied ones included) for its pruned version."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in changed:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(changed[id(param)], param.requires_grad)
                module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) in changed:
                module._buffers[name] = changed[id(buffer)]


def _sync_attributes(model: nn.Module, analysis: Analysis, decisions) -> None:
    from compsearch.kernels.quant import QUANT_TYPES, _conv1d_class

    conv1d = _conv1d_class()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if conv1d is not None and isinstance(module, conv1d):
            module.nx, module.nf = weight.shape
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.Conv2d):
            if module.groups > 1 and module.groups == module.in_channels:
                module.groups = weight.shape[0]
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (weight.shape[0],)
        if isinstance(module, QUANT_TYPES):
            module.on_resized()
    for name, kept in decisions.items():
        group = analysis.groups[name]
        if group.kind != "heads" or not group.attention:
            continue
        module = model.get_submodule(group.attention)
        old_kv, new_kv = group.size, len(kept)
        old_q, new_q = old_kv * group.q_per_kv, new_kv * group.q_per_kv
        for attribute in HEAD_ATTRS:
            if getattr(module, attribute, None) == old_q:
                setattr(module, attribute, new_q)
        for attribute in KV_HEAD_ATTRS:
            if getattr(module, attribute, None) == old_kv:
                setattr(module, attribute, new_kv)
        for attribute in WIDTH_ATTRS:
            if getattr(module, attribute, None) == old_q * group.head_dim:
                setattr(module, attribute, new_q * group.head_dim)


# -- helpers for callers ---------------------------------------------------------------------------


def scaled_plans(
    recipe: Recipe, factor_of: Callable[[float], float], with_depth: bool = True
) -> Recipe:
    """The recipe with every keep_ratio mapped by ``factor_of``, for one step of progressive
    pruning; blocks are dropped in the first step only (``with_depth``)."""
    import dataclasses

    layers = {}
    for key, plan in recipe.layers.items():
        if plan.keep_ratio is not None:
            plan = dataclasses.replace(plan, keep_ratio=factor_of(plan.keep_ratio))
        if not with_depth and plan.keep is not None:
            plan = dataclasses.replace(plan, keep=None)
        layers[key] = plan
    return dataclasses.replace(recipe, layers=layers)


def zero_removed_(model: nn.Module, analysis: Analysis, decisions: dict[str, torch.Tensor]) -> None:
    """Zero what pruning would remove on the producing side (rows, biases, per-channel parameters),
    leaving shapes alone: the reference that pruning inside blocks must equal."""
    tensors = _tensor_table(model)
    with torch.no_grad():
        for name, kept in decisions.items():
            group = analysis.groups[name]
            removed = torch.ones(group.size, dtype=torch.bool)
            removed[kept] = False
            units = torch.nonzero(removed).reshape(-1)
            for member, width in group.members:
                if member.role == "in":
                    continue
                index = group.indices(member, width, units)
                tensors[member.key].index_fill_(member.dim, index, 0.0)
