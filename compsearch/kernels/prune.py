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
   Before a group inside the blocks (heads, MLP neurons, conv channels — every kind but a residual
   stream) is committed, the pruned model must give, on the run's inputs, what the unpruned model
   gives with the removed units zeroed (the *masked-equivalence check*); a group that does not is
   refused with the error it showed. A prune that raises leaves the model as it was.
3. The kept indices are a :class:`PruneRecord` — plain data. :func:`replay_` applies a record to a
   fresh model, rebuilding the same architecture so a saved state dict loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels._modules import replace_module, transaction
from compsearch.kernels._prune_check import apply_checked, zero_removed_  # noqa: F401
from compsearch.kernels._prune_groups import (  # noqa: F401 - the public names of pruning
    HEAD_ATTRS,
    IMPORTANCES,
    KV_HEAD_ATTRS,
    WIDTH_ATTRS,
    Analysis,
    Group,
    Run,
    _sample,
    _tensor_table,
    analyze,
    importance,
    taylor_gradients,
)
from compsearch.kernels._prune_plan import (
    PruneRecord,
    PruneReport,
    kept_count,
    plan_from_recipe,
)
from compsearch.recipes.schema import Recipe

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
    with transaction(model):
        return _prune(model, recipe, run, method, round_to, seed, grads)


def _prune(model, recipe, run, method, round_to, seed, grads) -> tuple[PruneRecord, PruneReport]:
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
        decisions[name] = torch.sort(torch.topk(scores, count).indices).values
    report.untouched = _untouched(model, analysis)
    report.blocked = {n: g.reason for n, g in analysis.groups.items() if not g.prunable}
    refused = apply_checked(model, analysis, decisions, run, _apply)
    report.skipped.update(refused)
    for name, kept in decisions.items():
        if name in refused:
            continue
        group = analysis.groups[name]
        record.groups[name] = {"kind": group.kind, "size": group.size, "kept": kept.tolist()}
        report.pruned[name] = (len(kept), group.size)
    return record, report


def _untouched(model: nn.Module, analysis: Analysis) -> dict[str, str]:
    reached = {member.key for group in analysis.groups.values() for member, _ in group.members}
    return {
        key: "no prune group reaches it: the trace found no channel of it to remove"
        for key, param in model.named_parameters()
        if param.dim() >= 2 and key not in reached
    }


def replay_(model: nn.Module, record: PruneRecord, run: Run) -> None:
    """Apply ``record`` to a fresh model of the architecture it was made on."""
    with transaction(model):
        _replay(model, record, run)


def _replay(model: nn.Module, record: PruneRecord, run: Run) -> None:
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


# -- applying decisions ----------------------------------------------------------------------------


def _apply(model: nn.Module, analysis: Analysis, decisions: dict[str, torch.Tensor], run: Run):
    tensors = _tensor_table(model)
    keep: dict[tuple[str, int], set[int]] = {}
    for name, kept in decisions.items():
        group = analysis.groups[name]
        units = group.removed(kept)
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
            return run(model)
    except Exception as error:  # a bug in the analysis must not pass silently
        raise KernelError(
            f"the pruned model no longer runs ({type(error).__name__}: {error}). This is a bug in "
            "the dependency analysis for this architecture; please report it."
        ) from error


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
    from compsearch.kernels.quant import QUANT_TYPES, conv1d_class

    conv1d = conv1d_class()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if conv1d is not None and isinstance(module, conv1d):
            module.nx, module.nf = weight.shape
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
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
        for attention in group.attentions or (group.attention,):
            _sync_heads(model.get_submodule(attention), group, len(kept))


def _sync_heads(module: nn.Module, group: Group, new_kv: int) -> None:
    old_kv = group.size
    old_q, new_q = old_kv * group.q_per_kv, new_kv * group.q_per_kv
    groups = getattr(module, "num_key_value_groups", None)
    if group.queries_only and isinstance(groups, int) and old_q % groups == 0:
        kv = old_q // groups  # the shared key/value heads, unpruned: fewer queries read each
        if new_q % kv == 0:
            module.num_key_value_groups = new_q // kv
        return _sync_query_heads(module, old_q, new_q, group.head_dim)
    _sync_query_heads(module, old_q, new_q, group.head_dim)
    for attribute in KV_HEAD_ATTRS:
        if getattr(module, attribute, None) == old_kv:
            setattr(module, attribute, new_kv)


def _sync_query_heads(module: nn.Module, old_q: int, new_q: int, head_dim: int) -> None:
    for attribute in HEAD_ATTRS:
        if getattr(module, attribute, None) == old_q:
            setattr(module, attribute, new_q)
    for attribute in WIDTH_ATTRS:
        if getattr(module, attribute, None) == old_q * head_dim:
            setattr(module, attribute, new_q * head_dim)


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
