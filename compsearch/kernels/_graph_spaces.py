"""Channel spaces (a union-find over channel dimensions), their layouts, and what a trace finds.

See :mod:`compsearch.kernels.graph` for how a trace builds them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

# -- spaces ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Slice ``[offset, offset + length)`` of dimension ``dim`` of the tensor ``key`` (a state-dict
    name), indexed by the channels of one space. ``role`` is ``out`` (a producer's rows), ``in`` (a
    consumer's columns) or ``param`` (a per-channel parameter or buffer)."""

    key: str
    dim: int
    offset: int
    length: int
    role: str


class ChannelSpace:
    """A set of coupled channels. Union-find node; a refined space is a sequence of parts."""

    _ids = itertools.count()

    def __init__(self, size: int) -> None:
        self.id = next(ChannelSpace._ids)
        self.size = size
        self.parent: ChannelSpace | None = None
        self.parts: list[ChannelSpace] | None = None
        self.members: set[Member] = set()
        self.blocked: list[str] = []
        self.pinned: str | None = None
        self.splits: list[HeadSplit] = []
        self.adds = 0  # additions that merged into this space (residual streams)
        self.part_of: list[tuple[ChannelSpace, int]] = []  # (refined space, offset inside it)
        self.splits_from: frozenset[int] = frozenset()  # head splits a reader of this space saw

    def find(self) -> ChannelSpace:
        root = self
        while root.parent is not None:
            root = root.parent
        node = self
        while node.parent is not None:
            node.parent, node = root, node.parent
        return root

    def block(self, reason: str) -> None:
        root = self.find()
        if root.parts:
            for part in root.parts:
                part.block(reason)
        if reason not in root.blocked:
            root.blocked.append(reason)

    def leaves(self, offset: int = 0) -> list[tuple[ChannelSpace, int]]:
        """Atomic parts of this space's root with their offsets inside it."""
        root = self.find()
        if not root.parts:
            return [(root, offset)]
        out, start = [], offset
        for part in root.parts:
            out += part.leaves(start)
            start += part.size
        return out

    def refine(self, sizes: list[int]) -> list[ChannelSpace]:
        """Split this space into consecutive parts of ``sizes`` (reusing a matching refinement)."""
        root = self.find()
        if root.parts:
            if [p.size for p in root.parts] == sizes:
                return [p.find() for p in root.parts]
            leaves = root.leaves()
            if [leaf.size for leaf, _ in leaves] == sizes:
                return [leaf for leaf, _ in leaves]
            root.block("split into parts that do not line up with an earlier split")
            return []
        root.parts = [ChannelSpace(size) for size in sizes]
        offset = 0
        for part in root.parts:
            part.blocked += root.blocked
            part.pinned = root.pinned
            part.part_of.append((root, offset))
            offset += part.size
        return root.parts

    def all_members(self) -> list[Member]:
        """Members of this (atomic) space, including the slices of refined spaces it is part of."""
        root = self.find()
        found = set(root.members)
        for parent, offset in root.part_of:
            for member in parent.find().all_members():
                found.add(
                    Member(member.key, member.dim, member.offset + offset, root.size, member.role)
                )
        return sorted(found, key=lambda m: (m.key, m.dim, m.offset))


def union(a: ChannelSpace, b: ChannelSpace, reason: str = "") -> ChannelSpace:
    a, b = a.find(), b.find()
    if a is b:
        return a
    if a.size != b.size:
        a.block(f"coupled with a space of another size ({reason})")
        b.block(f"coupled with a space of another size ({reason})")
        return a
    if a.parts or b.parts:
        sizes = [p.size for p, _ in (a if a.parts else b).leaves()]
        left, right = a.refine(sizes), b.refine(sizes)
        if not left or not right:
            return a
        for x, y in zip(left, right, strict=True):
            union(x, y, reason)
        return a
    b.parent = a
    a.members |= b.members
    a.blocked += [r for r in b.blocked if r not in a.blocked]
    a.pinned = a.pinned or b.pinned
    a.splits += b.splits
    a.adds += b.adds
    a.part_of += b.part_of
    a.splits_from |= b.splits_from
    return a


@dataclass
class HeadSplit:
    """A view that split a space's channels into ``heads × head_dim``."""

    space: ChannelSpace
    heads: int
    head_dim: int
    owner: str  # innermost module running when it happened
    claimed: bool = False


@dataclass(frozen=True)
class Layout:
    """Where a tensor's channel dimension is and which spaces (in order) make it up."""

    dim: int
    spaces: tuple[ChannelSpace, ...]

    def parts(self) -> list[tuple[ChannelSpace, int]]:
        out, start = [], 0
        for space in self.spaces:
            for leaf, offset in space.leaves(start):
                out.append((leaf, offset))
            start += space.size
        return out

    def size(self) -> int:
        return sum(s.size for s in self.spaces)


@dataclass
class TensorInfo:
    layout: Layout | None = None
    lineage: frozenset[int] = frozenset()  # head splits this (untracked) tensor derives from
    origin: tuple[str, tuple[int | None, ...]] | None = None  # parameter key, dim map


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Attention:
    """One attention's head structure: q/k/v spaces split into heads, and the output projection."""

    module: str
    q: list[HeadSplit]
    kv: list[HeadSplit]
    out_space: ChannelSpace
    out_layer: str
    q_heads: int
    kv_heads: int
    head_dim: int
    # per-head parameters reaching the attention as its mask or bias (Swin's relative position
    # table): (state-dict key, the dimension that indexes query heads)
    head_params: list[tuple[str, int]] = field(default_factory=list)
    # channel spaces whose channels are this attention's query heads (T5's position bias, made by
    # an Embedding once and passed to every layer of the stack)
    head_spaces: list[ChannelSpace] = field(default_factory=list)
    fused_width: int = 0  # rows per head of a fused q/k/v projection (0: separate projections)
    blocked_by: list[str] = field(default_factory=list)  # why its heads cannot be pruned
    queries_only: bool = False  # query heads around one key/value head that is never split


@dataclass
class Block:
    """A residual block that can be dropped (its input is added back inside it)."""

    name: str
    returns_tuple: int  # 0: returns a tensor; n: returns an n-tuple with hidden states first


@dataclass
class Trace:
    spaces: list[ChannelSpace] = field(default_factory=list)
    splits: list[HeadSplit] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    # (head splits of the queries, parameter key, its head dimension) for attention masks that
    # carry a parameter's values along the head dimension
    head_params: list[tuple[frozenset, str, int]] = field(default_factory=list)
    head_spaces: list[tuple[frozenset, ChannelSpace]] = field(default_factory=list)
    head_blocks: list[tuple[frozenset, str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    producers: dict[int, str] = field(default_factory=dict)  # space id -> producing layer
    layers_out: dict[str, ChannelSpace] = field(default_factory=dict)  # layer -> its output space
    layers_in: dict[str, ChannelSpace] = field(default_factory=dict)
    module_of_key: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # layers in the order they first ran
