"""Channel-dependency analysis by tracing one forward pass.

Every torch function the model calls is recorded (a ``TorchFunctionMode``), so the analysis sees the
path the model really takes — any architecture, any Python control flow — with no model-specific
rules. For each tensor it follows which *channel space* its channel dimension belongs to:

* a Linear / Conv / Embedding creates a space for its output channels (its weight rows are the
  space's *producers*) and joins its input channels to the input's space (weight columns: consumers);
* norms, pointwise ops and parameters broadcast along the channel (LayerScale, RMSNorm weights, ViT
  position embeddings) join the space they touch;
* an addition of two tracked tensors merges their spaces: every write into a residual stream, and the
  stream's norms and embeddings, end up as one space (one pruning decision);
* a depthwise convolution keeps its input's space; ``split``/``chunk`` and ``cat`` along the channel
  dimension refine a space into parts (GPT-2's fused qkv, concatenations);
* a view that splits the channel dimension into (heads, head_dim) starts an attention: the tensor
  leaves channel tracking, and the Linear that later consumes whatever came out of those heads is
  the output projection. That gives attention head groups, grouped-query heads included, for any
  attention implementation (eager, SDPA, fused qkv, output projection inside or outside the module).

Whatever cannot be followed safely (an unknown op on a channel dimension, a reduction that mixes
channels, a head split that no projection claims) *blocks* the spaces involved, with the reason; a
space that reaches the model's output is *pinned*. Neither is ever pruned, and both are reported.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


class Space:
    """A set of coupled channels. Union-find node; a refined space is a sequence of parts."""

    _ids = itertools.count()

    def __init__(self, size: int) -> None:
        self.id = next(Space._ids)
        self.size = size
        self.parent: Space | None = None
        self.parts: list[Space] | None = None
        self.members: set[Member] = set()
        self.blocked: list[str] = []
        self.pinned: str | None = None
        self.splits: list[HeadSplit] = []
        self.adds = 0  # additions that merged into this space (residual streams)
        self.part_of: list[tuple[Space, int]] = []  # (refined space, offset inside it)
        self.splits_from: frozenset[int] = frozenset()  # head splits a reader of this space saw

    def find(self) -> Space:
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

    def leaves(self, offset: int = 0) -> list[tuple[Space, int]]:
        """Atomic parts of this space's root with their offsets inside it."""
        root = self.find()
        if not root.parts:
            return [(root, offset)]
        out, start = [], offset
        for part in root.parts:
            out += part.leaves(start)
            start += part.size
        return out

    def refine(self, sizes: list[int]) -> list[Space]:
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
        root.parts = [Space(size) for size in sizes]
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


def union(a: Space, b: Space, reason: str = "") -> Space:
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

    space: Space
    heads: int
    head_dim: int
    owner: str  # innermost module running when it happened
    claimed: bool = False


@dataclass(frozen=True)
class Layout:
    """Where a tensor's channel dimension is and which spaces (in order) make it up."""

    dim: int
    spaces: tuple[Space, ...]

    def parts(self) -> list[tuple[Space, int]]:
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
    out_space: Space
    out_layer: str
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Block:
    """A residual block that can be dropped (its input is added back inside it)."""

    name: str
    returns_tuple: int  # 0: returns a tensor; n: returns an n-tuple with hidden states first


@dataclass
class Trace:
    spaces: list[Space] = field(default_factory=list)
    splits: list[HeadSplit] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    producers: dict[int, str] = field(default_factory=dict)  # space id -> producing layer
    layers_out: dict[str, Space] = field(default_factory=dict)  # layer -> its output space
    layers_in: dict[str, Space] = field(default_factory=dict)
    module_of_key: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # layers in the order they first ran


# -- op tables -------------------------------------------------------------------------------------

POINTWISE = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "neg", "abs", "exp", "log",
    "contiguous", "clone", "detach", "to", "type", "float", "half", "bfloat16", "double", "cpu",
    "cuda", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "softplus", "mish",
    "erf", "sqrt", "rsqrt", "pow", "square", "sin", "cos", "reciprocal", "clamp", "clip",
    "dropout1d", "dropout2d", "feature_alpha_dropout", "alpha_dropout", "requires_grad",
    "requires_grad_", "glu_no", "gelu_", "relu_", "sigmoid_", "tanh_", "float_power", "round",
    "nan_to_num", "sign", "floor", "ceil", "logical_not", "bool", "long", "int",
}  # fmt: skip
BINARY = {
    "add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "radd", "rsub", "rmul",
    "rdiv", "truediv", "rtruediv", "iadd", "isub", "imul", "idiv", "itruediv", "add_", "sub_",
    "mul_", "div_", "addcmul", "eq", "ne", "lt", "gt", "le", "ge", "fmod", "remainder",
}  # fmt: skip
RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
POOL = {
    "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "interpolate",
    "upsample", "avg_pool1d", "max_pool1d", "adaptive_avg_pool1d", "max_pool2d_with_indices",
}  # fmt: skip
IGNORE = {"get", "set", "len", "size", "dim", "numel", "shape", "dtype", "device", "is_floating_point",
          "item", "tolist", "data_ptr", "stride", "element_size", "is_contiguous", "storage_offset",
          "is_complex", "layout", "requires_grad_get", "new_zeros", "new_ones", "new_full",
          "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like", "empty_like",
          "any", "all", "isnan", "isinf", "nonzero", "argmax", "argmin", "copy_", "fill_",
          "zero_", "normal_", "uniform_", "masked_fill_", "index_fill_"}  # fmt: skip


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", "") or str(func)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


# -- the tracer ------------------------------------------------------------------------------------


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.info: dict[int, TensorInfo] = {}
        self.keep: list[Any] = []  # keep traced tensors alive so their ids stay unique
        self.trace = Trace()
        self.key_of: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self.key_of.setdefault(id(param), name)
        for name, buffer in model.named_buffers(remove_duplicate=False):
            self.key_of.setdefault(id(buffer), name)
        for key in self.key_of.values():
            self.trace.module_of_key[key] = key.rpartition(".")[0]
        self.stack: list[str] = []
        self.layer_spaces: dict[str, Space] = {}
        self.block_inputs: dict[str, int] = {}
        self.block_hits: set[str] = set()

    # -- bookkeeping

    def get(self, tensor: Any) -> TensorInfo:
        if not isinstance(tensor, torch.Tensor):
            return TensorInfo()
        found = self.info.get(id(tensor))
        if found is not None:
            return found
        key = self.key_of.get(id(tensor))
        if key is not None:
            return TensorInfo(origin=(key, tuple(range(tensor.dim()))))
        return TensorInfo()

    def put(self, tensor: Any, info: TensorInfo) -> None:
        if isinstance(tensor, torch.Tensor) and (info.layout or info.lineage or info.origin):
            self.info[id(tensor)] = info
            self.keep.append(tensor)

    def space(self, size: int) -> Space:
        space = Space(size)
        self.trace.spaces.append(space)
        return space

    def owner(self) -> str:
        return self.stack[-1] if self.stack else ""

    def block_layout(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for space in layout.spaces:
                space.block(reason)

    # -- dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "iter" and isinstance(args[0], torch.Tensor):  # iterating = unbinding dim 0
            pieces = args[0].unbind(0)
            self.op_unbind(pieces, args[0], 0)
            return iter(pieces)
        out = func(*args, **kwargs)
        if name in IGNORE:
            return out
        inputs = _tensors(args) + _tensors(kwargs)
        infos = [self.get(t) for t in inputs]
        if not any(i.layout or i.lineage or i.origin for i in infos):
            return out
        handler = getattr(self, f"op_{name.rstrip('_')}", None)
        try:
            if handler is not None:
                handler(out, *args, **kwargs)
            elif name in POINTWISE or name.rstrip("_") in POINTWISE:
                self.pointwise(out, args[0] if args else kwargs.get("input"))
            elif name in BINARY or name.rstrip("_") in BINARY:
                self.binary(out, name, *args)
            elif name in RESHAPE:
                self.reshape(out, args[0])
            elif name in POOL:
                self.pooled(out, args[0] if args else kwargs.get("input"))
            else:
                self.unknown(out, name, inputs, infos)
        except (IndexError, TypeError, ValueError, KeyError) as error:
            self.unknown(out, f"{name} ({error})", inputs, infos)
        return out

    def unknown(self, out, name, inputs, infos) -> None:
        for info in infos:
            self.block_layout(info.layout, f"used by {name}, which the analysis does not follow")
        lineage = frozenset().union(*(i.lineage for i in infos))
        for tensor in _tensors(out):
            self.put(tensor, TensorInfo(lineage=lineage))

    def pointwise(self, out, x) -> None:
        info = self.get(x)
        origin = info.origin if isinstance(out, torch.Tensor) and out.shape == x.shape else None
        self.put(out, TensorInfo(info.layout, info.lineage, origin))

    def pooled(self, out, x) -> None:
        info = self.get(x)
        if info.layout is not None and info.layout.dim != 1:
            self.block_layout(info.layout, "pooled over the channel dimension")
            return
        self.put(out, TensorInfo(info.layout, info.lineage))

    # -- binary ops: additions merge spaces; parameters broadcast along channels join them

    def binary(self, out, name, *args) -> None:
        operands = [a for a in args if isinstance(a, torch.Tensor)]
        if not isinstance(out, torch.Tensor):
            return
        self.combine(out, operands, merge=name.strip("ri_") in ("add", "sub"), what=name)

    def combine(self, out: torch.Tensor, operands: list[torch.Tensor], merge: bool, what: str):
        infos = [self.get(t) for t in operands]
        lineage = frozenset().union(*(i.lineage for i in infos))
        layouts = []
        for tensor, info in zip(operands, infos, strict=True):
            if info.layout is None:
                continue
            dim = info.layout.dim - tensor.dim() + out.dim()  # right-aligned broadcasting
            layouts.append(Layout(dim, info.layout.spaces))
        if not layouts:
            origin = None
            if len(operands) == 1 and infos[0].origin and operands[0].shape == out.shape:
                origin = infos[0].origin
            self.put(out, TensorInfo(lineage=lineage, origin=origin))
            return
        first = layouts[0]
        for other in layouts[1:]:
            if other.dim != first.dim:
                for layout in layouts:
                    self.block_layout(layout, f"{what} of tensors with channels on other dims")
                return
            for a, b in zip(first.spaces, other.spaces, strict=False):
                merged = union(a, b, what)
                if merge:
                    merged.find().adds += 1
            if len(first.spaces) != len(other.spaces):
                self.block_layout(first, f"{what} of differently composed channels")
        size = first.size()
        for tensor, info in zip(operands, infos, strict=True):
            if info.layout is not None:
                continue
            dim = first.dim - out.dim() + tensor.dim()
            if dim < 0 or tensor.shape[dim] == 1:
                continue
            if info.origin is not None:
                key, dims = info.origin
                source = dims[dim]
                if source is None:
                    self.block_layout(first, f"{what} with a parameter broadcast oddly")
                    continue
                for space, offset in first.parts():
                    space.members.add(Member(key, source, offset, space.size, "param"))
            elif tensor.shape[dim] == size:
                self.block_layout(first, f"{what} with a tensor that varies along the channels")
        self.put(out, TensorInfo(first, lineage))

    def op_where(self, out, condition, a=None, b=None, **kwargs) -> None:
        self.combine(out, [t for t in (a, b) if isinstance(t, torch.Tensor)], True, "where")

    def op_masked_fill(self, out, x, mask, value=None) -> None:
        self.pointwise(out, x)

    def op_masked_scatter(self, out, x, mask, source) -> None:
        info, source_info = self.get(x), self.get(source)
        if info.layout and source_info.layout:
            for a, b in zip(info.layout.spaces, source_info.layout.spaces, strict=False):
                union(a, b, "masked_scatter")
        self.put(out, TensorInfo(info.layout or source_info.layout))

    # -- layers

    def layer_out(self, key: str, size: int) -> Space:
        space = self.layer_spaces.get(key)
        layer = self.trace.module_of_key[key]
        if layer not in self.trace.order:
            self.trace.order.append(layer)
        if space is None:
            space = self.layer_spaces[key] = self.space(size)
            self.trace.producers.setdefault(space.id, layer)
            self.trace.layers_out[layer] = space
        return space

    def consume(self, x, key: str, dim: int, what: str) -> None:
        """Weight ``key``'s dimension ``dim`` reads the channels of ``x``."""
        info = self.get(x)
        layer = self.trace.module_of_key.get(key, key)
        size = x.shape[-1] if what == "linear" else x.shape[1]
        if info.layout is not None:
            channel_dim = x.dim() - 1 if what == "linear" else 1
            if info.layout.dim != channel_dim:
                self.block_layout(info.layout, f"{layer} reads another dimension")
                return
            for space, offset in info.layout.parts():
                space.members.add(Member(key, dim, offset, space.size, "in"))
            self.trace.layers_in.setdefault(layer, info.layout.spaces[0])
            return
        space = self.trace.layers_in.get(layer)
        if space is None:
            space = self.space(size)
            self.trace.layers_in[layer] = space
        space.members.add(Member(key, dim, 0, size, "in"))
        if info.lineage:
            space.splits_from |= info.lineage  # claimed (or not) by the attention pass
        else:
            space.pinned = space.pinned or f"{layer} reads the model input or untracked data"

    def produce(self, out, weight_key: str, dim: int, bias, size: int, channel_dim: int) -> None:
        space = self.layer_out(weight_key, size)
        space.members.add(Member(weight_key, dim, 0, size, "out"))
        bias_key = self.key_of.get(id(bias)) if isinstance(bias, torch.Tensor) else None
        if bias_key:
            space.members.add(Member(bias_key, 0, 0, size, "out"))
        self.put(out, TensorInfo(Layout(channel_dim, (space,))))

    def op_linear(self, out, x, weight, bias=None) -> None:
        key = self.key_of.get(id(weight))
        if key is None:
            return self.unknown(out, "linear with a computed weight", [x], [self.get(x)])
        self.consume(x, key, 1, "linear")
        self.produce(out, key, 0, bias, weight.shape[0], out.dim() - 1)

    def op_addmm(self, out, bias, x, weight, **kwargs) -> None:  # GPT-2 Conv1D: x @ W + b
        key = self.key_of.get(id(weight))
        if key is None:
            return self.unknown(out, "addmm", [x], [self.get(x)])
        self.consume(x, key, 0, "linear")
        self.produce(out, key, 1, bias, weight.shape[1], out.dim() - 1)

    def op_conv2d(self, out, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        key = self.key_of.get(id(weight))
        info = self.get(x)
        if key is None:
            return self.unknown(out, "conv2d with a computed weight", [x], [info])
        channels = x.shape[1]
        if groups == 1:
            self.consume(x, key, 1, "conv")
            return self.produce(out, key, 0, bias, weight.shape[0], 1)
        if groups == channels and weight.shape[0] == channels and info.layout is not None:
            bias_key = self.key_of.get(id(bias)) if isinstance(bias, torch.Tensor) else None
            for space, offset in info.layout.parts():
                space.members.add(Member(key, 0, offset, space.size, "param"))
                if bias_key:
                    space.members.add(Member(bias_key, 0, offset, space.size, "param"))
            layer = self.trace.module_of_key[key]
            self.trace.layers_out[layer] = info.layout.spaces[0]
            if layer not in self.trace.order:
                self.trace.order.append(layer)
            return self.put(out, TensorInfo(info.layout))
        self.block_layout(info.layout, "grouped convolution")
        self.produce(out, key, 0, bias, weight.shape[0], 1)
        self.layer_spaces[key].block("grouped convolution")

    def op_embedding(self, out, ids, weight, *args, **kwargs) -> None:
        key = self.key_of.get(id(weight))
        if key is None:
            return
        space = self.layer_out(key, weight.shape[1])
        space.members.add(Member(key, 1, 0, weight.shape[1], "out"))
        self.put(out, TensorInfo(Layout(out.dim() - 1, (space,))))

    def norm_params(self, layout: Layout | None, tensors) -> None:
        for tensor in tensors:
            key = self.key_of.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if key and layout is not None:
                for space, offset in layout.parts():
                    space.members.add(Member(key, 0, offset, space.size, "param"))

    def op_layer_norm(self, out, x, normalized_shape, weight=None, bias=None, eps=1e-5):
        info = self.get(x)
        if info.layout is not None and (
            len(normalized_shape) != 1 or info.layout.dim != x.dim() - 1
        ):
            self.block_layout(info.layout, "layer norm over more than the channels")
            return
        self.norm_params(info.layout, (weight, bias))
        self.put(out, TensorInfo(info.layout, info.lineage))

    def op_rms_norm(self, out, x, normalized_shape, weight=None, eps=None):
        self.op_layer_norm(out, x, normalized_shape, weight, None)

    def op_batch_norm(self, out, x, running_mean, running_var, weight=None, bias=None, *a, **k):
        info = self.get(x)
        if info.layout is not None and info.layout.dim != 1:
            self.block_layout(info.layout, "batch norm over another dimension")
            return
        self.norm_params(info.layout, (running_mean, running_var, weight, bias))
        self.put(out, TensorInfo(info.layout))

    def op_group_norm(self, out, x, num_groups, weight=None, bias=None, eps=1e-5):
        info = self.get(x)
        if num_groups != 1:
            self.block_layout(info.layout, "group norm with channel groups")
        else:
            self.norm_params(info.layout, (weight, bias))
        self.put(out, TensorInfo(info.layout))

    # -- shapes

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
            return self.put(out, TensorInfo(lineage=info.lineage))
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

    def op_scaled_dot_product_attention(self, out, q, k, v, *args, **kwargs) -> None:
        infos = [self.get(t) for t in (q, k, v)]
        for info in infos:
            self.block_layout(info.layout, "attention over tracked channels")
        self.put(out, TensorInfo(lineage=frozenset().union(*(i.lineage for i in infos))))


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
    """``(heads, head_dim)`` if the reshape splits dimension ``dim`` into two consecutive ones."""
    size = before[dim]
    prefix, suffix = math.prod(before[:dim]), math.prod(before[dim + 1 :])
    for j in range(len(after) - 1):
        if (
            after[j] * after[j + 1] == size
            and after[j] > 1
            and after[j + 1] > 1
            and math.prod(after[:j]) == prefix
            and math.prod(after[j + 2 :]) == suffix
        ):
            return after[j], after[j + 1]
    return None


def _reshape_origin(origin, before, after):
    key, dims = origin
    squeezed_before = [(s, d) for s, d in zip(before, dims, strict=True) if s != 1]
    squeezed_after = [s for s in after if s != 1]
    if [s for s, _ in squeezed_before] != squeezed_after:
        return None
    sources = iter(d for _, d in squeezed_before)
    return key, tuple(None if s == 1 else next(sources) for s in after)


# -- running a trace -------------------------------------------------------------------------------


def trace_model(model: nn.Module, run: Callable[[nn.Module], Any]) -> Trace:
    """Trace one forward (``run(model)``) and return the channel spaces, attentions and blocks."""
    tracer = _Tracer(model)
    handles = _block_hooks(model, tracer)
    was_training = model.training
    model.eval()
    from compsearch.kernels.quant import float_forward

    try:
        with torch.no_grad(), float_forward(), tracer:
            output = run(model)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for tensor in _tensors(output):
        layout = tracer.get(tensor).layout
        if layout is not None:
            for space in layout.spaces:
                for leaf, _ in space.leaves():
                    leaf.pinned = leaf.pinned or "reaches the model output"
                space.find().pinned = space.find().pinned or "reaches the model output"
    _find_attentions(tracer)
    return tracer.trace


def _block_hooks(model: nn.Module, tracer: _Tracer) -> list:
    """Hooks that keep the module stack, and find residual blocks in ModuleLists / Sequentials."""
    handles = []
    stacked = set()
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            stacked.update(id(child) for child in container.children())
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(module, args, kwargs, name=name):
            tracer.stack.append(name)
            if id(module) in stacked:
                first = args[0] if args else kwargs.get("hidden_states")
                if isinstance(first, torch.Tensor):
                    tracer.block_inputs[name] = id(first)
                    tracer.keep.append(first)

        def post(module, args, kwargs, output, name=name):
            tracer.stack.pop()
            if name in tracer.block_hits:
                first = args[0] if args else kwargs.get("hidden_states")
                result = output[0] if isinstance(output, tuple) else output
                if (
                    isinstance(result, torch.Tensor)
                    and isinstance(first, torch.Tensor)
                    and result.shape == first.shape
                ):
                    size = len(output) if isinstance(output, tuple) else 0
                    if all(b.name != name for b in tracer.trace.blocks):
                        tracer.trace.blocks.append(Block(name, size))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    original = tracer.combine

    def combine(out, operands, merge, what):
        if merge:
            ids = {id(t) for t in operands}
            for block, tensor_id in tracer.block_inputs.items():
                if tensor_id in ids and block in tracer.stack:
                    tracer.block_hits.add(block)
        return original(out, operands, merge, what)

    tracer.combine = combine
    return handles


def _find_attentions(tracer: _Tracer) -> None:
    """Pair each set of head splits with the Linear that consumes what came out of them."""
    trace = tracer.trace
    for layer, space in list(trace.layers_in.items()):
        lineage = space.find().splits_from
        if not lineage:
            continue
        splits = [trace.splits[i] for i in sorted(lineage)]
        attention = _attention(layer, space, splits)
        if attention is None:
            space.pinned = space.pinned or f"{layer} reads attention heads it cannot be paired with"
            continue
        for split in splits:
            split.claimed = True
        trace.attentions.append(attention)
    for split in trace.splits:
        if not split.claimed:
            split.space.block("split into heads that no output projection reads")


def _attention(layer: str, out_space: Space, splits: list[HeadSplit]) -> Attention | None:
    spaces = {id(s.space.find()) for s in splits}
    if len(spaces) != len(splits) or not 2 <= len(splits) <= 3:
        return None
    q_heads = max(s.heads for s in splits)
    head_dims = {s.head_dim for s in splits}
    if len(head_dims) != 1:
        return None
    head_dim = head_dims.pop()
    queries = [s for s in splits if s.heads == q_heads]
    kv = [s for s in splits if s.heads != q_heads]
    if not kv:  # multi-head attention: all splits have the same head count
        queries, kv = splits[:1], splits[1:]
    kv_heads = kv[0].heads
    if any(s.heads != kv_heads for s in kv) or q_heads % kv_heads:
        return None
    if out_space.size != q_heads * head_dim:
        return None
    module = _common_prefix([s.owner for s in splits])
    return Attention(module, queries, kv, out_space, layer, q_heads, kv_heads, head_dim)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)
