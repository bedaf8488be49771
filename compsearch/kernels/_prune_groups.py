"""Pruning groups: the coupled channels and heads a trace finds, named by their anchor layer.

See :mod:`compsearch.kernels.prune`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels.graph import ChannelSpace, Member, Trace, trace_model

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
    attentions: tuple[str, ...] = ()  # every attention whose heads this group prunes, if several
    queries_only: bool = False  # query heads sharing one key/value head (multi-query attention)

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def removed(self, kept: torch.Tensor) -> torch.Tensor:
        """The units a decision that keeps ``kept`` removes."""
        gone = torch.ones(self.size, dtype=torch.bool)
        gone[kept] = False
        return torch.nonzero(gone).reshape(-1)

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
    for together in _sharing_head_spaces(trace.attentions):
        group = _head_group(together, order)
        for attention in together:
            spaces = [s.space for s in attention.q + attention.kv] + [attention.out_space]
            for space in spaces + attention.head_spaces:
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


def _producers(root: ChannelSpace, trace: Trace) -> list[str]:
    return sorted({trace.module_of_key[m.key] for m in root.all_members() if m.role == "out"})


def _channel_group(
    root: ChannelSpace, trace: Trace, order: dict[str, int], embeddings: set[str]
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


def _sharing_head_spaces(attentions: list) -> list[list]:
    """Attentions in clusters: those fed one per-head space (T5's position bias, reused by every
    layer of a stack) keep the same heads, so they make one group."""
    clusters: list[list] = []
    by_space: dict[int, list] = {}
    for attention in attentions:
        found = [by_space[s.find().id] for s in attention.head_spaces if s.find().id in by_space]
        if found:
            cluster = found[0]
            for other in found[1:]:
                if other is not cluster:
                    cluster.extend(other)
                    clusters.remove(other)
            cluster.append(attention)
        else:
            cluster = [attention]
            clusters.append(cluster)
        for member in cluster:
            for space in member.head_spaces:
                by_space[space.find().id] = cluster
    return clusters


def _head_group(together: list, order: dict[str, int]) -> Group:
    if len(together) == 1:
        return _one_head_group(together[0], order)
    groups = [_one_head_group(attention, order) for attention in together]
    first = groups[0]
    reasons = [g.reason for g in groups if g.reason]
    if len({(g.size, g.q_per_kv, g.head_dim) for g in groups}) > 1:
        reasons.append("attentions sharing one position bias with different head counts")
    layers = sorted({n for g in groups for n in g.layers}, key=lambda n: order.get(n, 0))
    members = []
    for group in groups:
        members += [m for m in group.members if m not in members]
    return Group(
        first.name, "heads", first.size, members, layers, "; ".join(reasons) or None,
        attention=first.attention, q_per_kv=first.q_per_kv, head_dim=first.head_dim,
        attentions=tuple(g.attention for g in groups if g.attention),
    )  # fmt: skip


def _one_head_group(attention, order: dict[str, int]) -> Group:
    g = attention.q_heads // attention.kv_heads
    width_q = g * attention.head_dim
    members: list[tuple[Member, int]] = []
    reasons = []
    split_width = attention.fused_width or width_q
    for split, width in [(s, split_width) for s in attention.q] + [
        (s, attention.head_dim) for s in attention.kv
    ]:
        space = split.space.find()
        members += [(m, width) for m in space.all_members()]
        reasons += space.blocked + ([space.pinned] if space.pinned else [])
    out = attention.out_space.find()
    members += [(m, width_q) for m in out.all_members()]
    for key, dim in attention.head_params:  # a table with a column per query head
        members.append((Member(key, dim, 0, attention.q_heads, "param"), g))
    for space in attention.head_spaces:  # a bias made per query head (T5's embedding)
        members += [(m, g) for m in space.all_members()]
        reasons += space.blocked + ([space.pinned] if space.pinned else [])
    reasons += out.blocked + ([out.pinned] if out.pinned else []) + attention.blocked_by
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
        queries_only=attention.queries_only,
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
            total += (scores / mean).cpu()
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


def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    table = dict(model.named_parameters(remove_duplicate=False))
    table.update(dict(model.named_buffers(remove_duplicate=False)))
    return table


def _sample(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "") if names else "none"
