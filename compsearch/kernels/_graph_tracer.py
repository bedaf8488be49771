"""The tracer: a ``TorchFunctionMode`` that dispatches every torch call of a forward to a handler.

See :mod:`compsearch.kernels.graph`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from compsearch.kernels._graph_layers import LayerOps
from compsearch.kernels._graph_shapes import ShapeOps
from compsearch.kernels._graph_spaces import ChannelSpace, Layout, Member, TensorInfo, Trace, union

# -- op tables -------------------------------------------------------------------------------------

POINTWISE = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "neg", "abs", "exp", "log",
    "contiguous", "clone", "detach", "to", "type", "float", "half", "bfloat16", "double", "cpu",
    "cuda", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "softplus", "mish",
    "erf", "sqrt", "rsqrt", "pow", "square", "sin", "cos", "reciprocal", "clamp", "clip",
    "dropout1d", "dropout2d", "feature_alpha_dropout", "alpha_dropout", "requires_grad",
    "requires_grad_", "glu_no", "gelu_", "relu_", "sigmoid_", "tanh_", "float_power", "round",
    "nan_to_num", "sign", "floor", "ceil", "logical_not", "bool", "long", "int", "type_as",
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
    if name == "__get__":  # a property: ``.T`` and ``.mT`` transpose, the others are metadata
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        return {"T": "t", "mT": "mT"}.get(prop, "get")
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


def _broadcast_origin(out: torch.Tensor, operands, infos):
    """A parameter combined with untracked tensors (Swin's position table plus its window mask):
    a dimension keeps the parameter's origin where only the parameter varies along it."""
    (tensor, info), *_ = [(t, i) for t, i in zip(operands, infos, strict=True) if i.origin]
    key, dims = info.origin
    extra = out.dim() - tensor.dim()
    if extra < 0:
        return None
    kept = [None] * extra
    for j, source in enumerate(dims):
        at = j + extra
        others_vary = any(
            other is not tensor and other.dim() > out.dim() - at - 1
            and other.shape[other.dim() - (out.dim() - at)] != 1
            for other in operands
        )  # fmt: skip
        whole = tensor.shape[j] == out.shape[at]
        kept.append(source if whole and not others_vary else None)
    return (key, tuple(kept)) if any(d is not None for d in kept) else None


# -- the tracer ------------------------------------------------------------------------------------


class Tracer(LayerOps, ShapeOps, TorchFunctionMode):
    """Records every torch function a forward calls and follows channel spaces through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.info: dict[int, TensorInfo] = {}
        self.keep: list[Any] = []  # keep traced tensors alive so their ids stay unique
        self.trace = Trace()
        self.key_of: dict[int, str] = {}
        self.names_of: dict[int, list[str]] = {}  # a tied tensor has a name in each module
        for name, param in model.named_parameters(remove_duplicate=False):
            self.key_of.setdefault(id(param), name)
            self.names_of.setdefault(id(param), []).append(name)
        for name, buffer in model.named_buffers(remove_duplicate=False):
            self.key_of.setdefault(id(buffer), name)
            self.names_of.setdefault(id(buffer), []).append(name)
        self.canonical: dict[str, str] = {}  # every name of a tensor -> its first name
        for names in self.names_of.values():
            for key in names:
                self.trace.module_of_key[key] = key.rpartition(".")[0]
                self.canonical[key] = names[0]
        self.stack: list[str] = []
        self.layer_spaces: dict[tuple[str, int], ChannelSpace] = {}
        self.block_inputs: dict[str, int] = {}
        self.block_hits: set[str] = set()

    # -- bookkeeping

    def layer_key(self, tensor: Any) -> str | None:
        """The state-dict name of a layer's weight as the running module has it: a tied weight
        (GPT-2's lm_head and token embedding) is the head's own weight when the head uses it."""
        names = self.names_of.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if not names:
            return None
        owner = self.owner()
        return next((n for n in names if n.rpartition(".")[0] == owner), names[0])

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

    def space(self, size: int) -> ChannelSpace:
        space = ChannelSpace(size)
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
            elif sum(1 for i in infos if i.origin) == 1:
                origin = _broadcast_origin(out, operands, infos)
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
