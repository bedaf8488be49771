"""The tracer's handlers for ops that move channels around: reshapes, permutes, splits, cats,
reductions and attention.

A mixin of :class:`compsearch.kernels._graph_tracer.Tracer`; see :mod:`compsearch.kernels.graph`.
"""

from __future__ import annotations

import math

import torch

from compsearch.kernels._graph_spaces import HeadSplit, Layout, TensorInfo, union


class ShapeOps:
    def reshape(self, out, x) -> None:
        info = self.get(x)
        if not isinstance(out, torch.Tensor):
            return
        if info.layout is None:
            origin = None
            if info.origin is not None:
                origin = _reshape_origin(info.origin, x.shape, out.shape)
            self.put(out, TensorInfo(lineage=info.lineage, origin=origin))
            return
        dim = _follow_dim(tuple(x.shape), tuple(out.shape), info.layout.dim)
        if dim is not None:
            return self.put(out, TensorInfo(Layout(dim, info.layout.spaces), info.lineage))
        heads = _head_split(tuple(x.shape), tuple(out.shape), info.layout.dim)
        if heads is not None and len(info.layout.spaces) == 1:
            space = info.layout.spaces[0].find()
            if not space.parts:
                split = HeadSplit(space, heads[0], heads[1], self.owner())
                self.trace.splits.append(split)
                space.splits.append(split)
                lineage = info.lineage | {len(self.trace.splits) - 1}
                return self.put(out, TensorInfo(lineage=lineage))
        self.block_layout(info.layout, f"reshaped {tuple(x.shape)} → {tuple(out.shape)}")

    def op_permute(self, out, x, *dims) -> None:
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        self.moved(out, x, [d % x.dim() for d in dims])

    def op_transpose(self, out, x, dim0, dim1) -> None:
        order = list(range(x.dim()))
        a, b = dim0 % x.dim(), dim1 % x.dim()
        order[a], order[b] = order[b], order[a]
        self.moved(out, x, order)

    def op_t(self, out, x) -> None:
        self.moved(out, x, list(range(x.dim()))[::-1])

    def op_mT(self, out, x) -> None:
        self.op_transpose(out, x, -2, -1)

    def op_swapaxes(self, out, x, dim0, dim1) -> None:
        self.op_transpose(out, x, dim0, dim1)

    def op_movedim(self, out, x, source, destination) -> None:
        order = list(range(x.dim()))
        moved = order.pop(source % x.dim())
        order.insert(destination % x.dim(), moved)
        self.moved(out, x, order)

    def moved(self, out, x, order: list[int]) -> None:
        info = self.get(x)
        layout = Layout(order.index(info.layout.dim), info.layout.spaces) if info.layout else None
        origin = None
        if info.origin is not None:
            key, dims = info.origin
            origin = (key, tuple(dims[i] for i in order))
        self.put(out, TensorInfo(layout, info.lineage, origin))

    def op_unsqueeze(self, out, x, dim) -> None:
        self.reshape(out, x)

    def op_squeeze(self, out, x, *args, **kwargs) -> None:
        self.reshape(out, x)

    def op_expand(self, out, x, *sizes) -> None:
        info = self.get(x)
        origin = None
        if info.origin is not None:
            key, dims = info.origin
            extra = out.dim() - x.dim()
            origin = (key, (None,) * extra + tuple(d if x.shape[i] != 1 or out.shape[i + extra] == 1
                                                   else None for i, d in enumerate(dims)))  # fmt: skip
        layout = None
        if info.layout is not None:
            layout = Layout(info.layout.dim + out.dim() - x.dim(), info.layout.spaces)
        self.put(out, TensorInfo(layout, info.lineage, origin))

    def op_expand_as(self, out, x, other) -> None:
        self.op_expand(out, x)

    def op_repeat(self, out, x, *sizes) -> None:
        info = self.get(x)
        if (
            info.layout is not None
            and out.shape[-x.dim() + info.layout.dim] != x.shape[info.layout.dim]
        ):
            self.block_layout(info.layout, "repeated along the channels")
            return
        self.op_expand(out, x)

    def op_getitem(self, out, x, index) -> None:
        info = self.get(x)
        if not isinstance(out, torch.Tensor):
            return
        if info.layout is None:
            origin = _index_origin(info.origin, x, out, index) if info.origin else None
            return self.put(out, TensorInfo(lineage=info.lineage, origin=origin))
        dim = info.layout.dim
        entries = list(index) if isinstance(index, tuple) else [index]
        if any(e is Ellipsis for e in entries):
            at = entries.index(Ellipsis)
            fill = x.dim() - sum(1 for e in entries if e is not None and e is not Ellipsis)
            entries = entries[:at] + [slice(None)] * fill + entries[at + 1 :]
        consumed = [e for e in entries if e is not None]
        trailing = consumed[dim:] if len(consumed) > dim else []
        full = all(isinstance(e, slice) and e == slice(None) for e in trailing)
        new_dim = out.dim() - (x.dim() - dim)
        if full and 0 <= new_dim < out.dim() and out.shape[new_dim] == x.shape[dim]:
            return self.put(out, TensorInfo(Layout(new_dim, info.layout.spaces), info.lineage))
        self.block_layout(info.layout, "indexed along the channels")

    def op_split(self, out, x, split_size, dim=0) -> None:
        self.parts(out, x, dim)

    def op_chunk(self, out, x, chunks, dim=0) -> None:
        self.parts(out, x, dim)

    def op_tensor_split(self, out, x, sections, dim=0) -> None:
        self.parts(out, x, dim)

    def op_unbind(self, out, x, dim=0) -> None:
        info = self.get(x)
        dim = dim % x.dim()
        if info.layout is not None and dim == info.layout.dim:
            return self.block_layout(info.layout, "unbound along the channels")
        layout = None
        if info.layout is not None:
            layout = Layout(info.layout.dim - (dim < info.layout.dim), info.layout.spaces)
        for piece in out:
            self.put(piece, TensorInfo(layout, info.lineage))

    def parts(self, out, x, dim) -> None:
        info = self.get(x)
        pieces = list(out)
        if info.layout is None:
            for piece in pieces:
                self.put(piece, TensorInfo(lineage=info.lineage))
            return
        if dim % x.dim() != info.layout.dim:
            for piece in pieces:
                if piece.dim() == x.dim():
                    self.put(piece, TensorInfo(info.layout, info.lineage))
            return
        sizes = [p.shape[info.layout.dim] for p in pieces]
        if len(info.layout.spaces) != 1:
            return self.block_layout(info.layout, "split across concatenated channels")
        refined = info.layout.spaces[0].refine(sizes)
        for piece, space in zip(pieces, refined, strict=False):
            self.put(piece, TensorInfo(Layout(info.layout.dim, (space,)), info.lineage))

    def op_cat(self, out, tensors, dim=0) -> None:
        tensors = list(tensors)
        infos = [self.get(t) for t in tensors]
        dim = dim % out.dim()
        lineage = frozenset().union(*(i.lineage for i in infos))
        tracked = [i.layout for i in infos if i.layout is not None]
        if not tracked:
            return self.put(out, TensorInfo(lineage=lineage))
        if all(layout.dim == dim for layout in tracked) and len(tracked) == len(tensors):
            spaces = tuple(s for layout in tracked for s in layout.spaces)
            return self.put(out, TensorInfo(Layout(dim, spaces), lineage))
        if any(layout.dim == dim for layout in tracked):
            for layout in tracked:
                self.block_layout(layout, "concatenated with untracked channels")
            return
        self.combine(out, tensors, merge=False, what="cat")

    def op_concat(self, out, tensors, dim=0) -> None:
        self.op_cat(out, tensors, dim)

    def op_concatenate(self, out, tensors, dim=0) -> None:
        self.op_cat(out, tensors, dim)

    def op_stack(self, out, tensors, dim=0) -> None:
        infos = [self.get(t) for t in tensors]
        layouts = [i.layout for i in infos if i.layout is not None]
        if not layouts:
            return self.put(out, TensorInfo(lineage=frozenset().union(*(i.lineage for i in infos))))
        if len(layouts) != len(infos):
            for layout in layouts:
                self.block_layout(layout, "stacked with untracked tensors")
            return
        for layout in layouts[1:]:
            for a, b in zip(layouts[0].spaces, layout.spaces, strict=False):
                union(a, b, "stack")
        shift = 1 if dim % out.dim() <= layouts[0].dim else 0
        self.put(out, TensorInfo(Layout(layouts[0].dim + shift, layouts[0].spaces)))

    def reduce(self, out, x, dim=None, keepdim=False) -> None:
        info = self.get(x)
        if info.layout is None:
            return self.put(out, TensorInfo(lineage=info.lineage))
        dims = (
            list(range(x.dim()))
            if dim is None
            else [d % x.dim() for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        )
        if info.layout.dim in dims:
            return  # channels reduced away (a norm's statistic, a pooled score): nothing to follow
        new = (
            info.layout.dim if keepdim else info.layout.dim - sum(d < info.layout.dim for d in dims)
        )
        self.put(out, TensorInfo(Layout(new, info.layout.spaces), info.lineage))

    def op_mean(self, out, x, dim=None, keepdim=False, **kwargs) -> None:
        self.reduce(out, x, dim, keepdim)

    def op_sum(self, out, x, dim=None, keepdim=False, **kwargs) -> None:
        self.reduce(out, x, dim, keepdim)

    def op_amax(self, out, x, dim=(), keepdim=False) -> None:
        self.reduce(out, x, dim if dim != () else None, keepdim)

    def op_var(self, out, x, dim=None, *args, keepdim=False, **kwargs) -> None:
        self.reduce(out, x, dim, keepdim)

    def op_norm(self, out, x, p="fro", dim=None, keepdim=False, **kwargs) -> None:
        self.reduce(out, x, dim, keepdim)

    def op_softmax(self, out, x, dim=None, *args, **kwargs) -> None:
        info = self.get(x)
        if info.layout is not None and dim is not None and dim % x.dim() == info.layout.dim:
            self.block_layout(info.layout, "softmax over the channels")
            return
        self.pointwise(out, x)

    def op_log_softmax(self, out, x, dim=None, *args, **kwargs) -> None:
        self.op_softmax(out, x, dim)

    def op_pad(self, out, x, pad, *args, **kwargs) -> None:
        info = self.get(x)
        if info.layout is not None:
            touched = [x.dim() - 1 - i // 2 for i, p in enumerate(pad) if p]
            if info.layout.dim in touched:
                return self.block_layout(info.layout, "padded along the channels")
        self.pointwise(out, x)

    def op_roll(self, out, x, shifts, dims=None) -> None:
        """Swin's cyclic shift of its windows: a roll along other dimensions keeps the channels."""
        info = self.get(x)
        rolled = [dims] if isinstance(dims, int) else list(dims or range(x.dim()))
        if info.layout is not None and info.layout.dim in [d % x.dim() for d in rolled]:
            return self.block_layout(info.layout, "rolled along the channels")
        self.pointwise(out, x)

    def op_scaled_dot_product_attention(self, out, q, k, v, *args, **kwargs) -> None:
        infos = [self.get(t) for t in (q, k, v)]
        for info in infos:
            self.block_layout(info.layout, "attention over tracked channels")
        mask = kwargs.get("attn_mask", args[0] if args else None)
        origin = self.get(mask).origin if isinstance(mask, torch.Tensor) else None
        if origin is not None and mask.dim() == 4 and mask.shape[1] == q.shape[1] > 1:
            key, dims = origin
            if dims[1] is not None:  # a parameter's values per query head: pruned with the heads
                self.trace.head_params.append((infos[0].lineage, key, dims[1]))
        layout = self.get(mask).layout if isinstance(mask, torch.Tensor) else None
        if layout is not None and mask.dim() == 4 and layout.dim == 1 and len(layout.spaces) == 1:
            self.trace.head_spaces.append((infos[0].lineage, layout.spaces[0]))
        else:
            self.block_layout(layout, "an attention mask made from tracked channels")
        per_head = (
            isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] > 1
            and not torch.equal(mask, mask[:, :1].expand_as(mask))  # not one mask for all heads
        )  # fmt: skip
        if per_head and origin is None and layout is None:
            self.trace.head_blocks.append((infos[0].lineage, COMPUTED_HEAD_BIAS))
        self.put(out, TensorInfo(lineage=frozenset().union(*(i.lineage for i in infos))))

    def op_baddbmm(self, out, bias, batch1, batch2, *args, **kwargs) -> None:
        """BLOOM's ``alibi.baddbmm(q, k)``: a bias per (batch × head) made at run time."""
        lineage = self.get(batch1).lineage
        untracked = isinstance(bias, torch.Tensor) and not (
            self.get(bias).origin or self.get(bias).layout
        )
        varies = untracked and bias.dim() == 3 and not torch.equal(bias, bias[:1].expand_as(bias))
        if lineage and varies:
            self.trace.head_blocks.append((lineage, COMPUTED_HEAD_BIAS))
        tensors = [t for t in (bias, batch1, batch2) if isinstance(t, torch.Tensor)]
        self.unknown(out, "baddbmm", tensors, [self.get(t) for t in tensors])


COMPUTED_HEAD_BIAS = (
    "a per-head attention bias computed at run time from the head count (ALiBi, say): pruning "
    "heads would give the kept heads other heads' biases"
)


def _follow_dim(before: tuple[int, ...], after: tuple[int, ...], dim: int) -> int | None:
    """Where dimension ``dim`` of a tensor of shape ``before`` is after a reshape to ``after``,
    if it survives whole (matched by the product of the dimensions on either side)."""
    size = before[dim]
    prefix, suffix = math.prod(before[:dim]), math.prod(before[dim + 1 :])
    for j, value in enumerate(after):
        if value == size and math.prod(after[:j]) == prefix and math.prod(after[j + 1 :]) == suffix:
            return j
    return None


def _head_split(before, after, dim) -> tuple[int, int] | None:
    """``(heads, head_dim)`` if the reshape splits dimension ``dim`` into heads and what each head
    holds: one dimension (head_dim), or several (BLOOM's fused ``(heads, 3, head_dim)``)."""
    size = before[dim]
    prefix, suffix = math.prod(before[:dim]), math.prod(before[dim + 1 :])
    for width in range(1, len(after)):
        for j in range(len(after) - width):
            rest = math.prod(after[j + 1 : j + 1 + width])
            if (
                after[j] * rest == size
                and after[j] > 1
                and rest > 1
                and math.prod(after[:j]) == prefix
                and math.prod(after[j + 1 + width :]) == suffix
            ):
                return after[j], rest
    return None


def _reshape_origin(origin, before, after):
    key, dims = origin
    squeezed_before = [(s, d) for s, d in zip(before, dims, strict=True) if s != 1]
    squeezed_after = [s for s in after if s != 1]
    if [s for s, _ in squeezed_before] != squeezed_after:
        # dimensions that survive whole keep their origin (a table's head column after a view)
        followed = [None] * len(after)
        for i, source in enumerate(dims):
            j = _follow_dim(tuple(before), tuple(after), i) if source is not None else None
            if j is not None and before[i] > 1:
                followed[j] = source
        return (key, tuple(followed)) if any(d is not None for d in followed) else None
    sources = iter(d for _, d in squeezed_before)
    return key, tuple(None if s == 1 else next(sources) for s in after)


def _index_origin(origin, x: torch.Tensor, out: torch.Tensor, index):
    """A parameter indexed by rows (``table[index]``) or sliced: the dimensions left whole keep
    their origin; the indexed or sliced ones lose it."""
    key, dims = origin
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(e is None or e is Ellipsis or isinstance(e, (int, bool)) for e in entries):
        return None
    tensors = [i for i, e in enumerate(entries) if isinstance(e, torch.Tensor)]
    if tensors and (tensors != [0] or len(entries) > x.dim()):
        return None  # advanced indexing other than rows of the first dimension
    entries += [slice(None)] * (x.dim() - len(entries))
    whole = [isinstance(e, slice) and e == slice(None) for e in entries]
    lead = out.dim() - x.dim() + 1 if tensors else 0  # the index tensor's own dimensions
    kept = tuple([None] * lead + [d if w else None for d, w in zip(dims, whole, strict=True)][
        1 if tensors else 0 :])  # fmt: skip
    if len(kept) != out.dim() or all(d is None for d in kept):
        return None
    return key, kept
