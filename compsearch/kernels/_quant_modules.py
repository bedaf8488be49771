"""Quantizer modules and the Quant layers (Linear, Conv1d, Conv2d, Embedding, GPT-2's Conv1D) that wrap
them. See :mod:`compsearch.kernels.quant`.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compsearch.errors import KernelError
from compsearch.kernels._quant_grid import (
    ACT_QMAX,
    SCALE_MIN,
    QuantSpec,
    grouped,
    rows_view,
)
from compsearch.kernels.formats import get_format, weight_scale

# -- quantizer modules -----------------------------------------------------------------------------


class WeightQuantizer(nn.Module):
    """Fake-quantizes one weight. Scales follow the weight (amax × clip ratio) unless learned (LSQ)."""

    def __init__(self, spec: QuantSpec, rows: int, fan_in: int, transposed: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.transposed = transposed
        groups = fan_in // spec.group_size if spec.granularity == "per_group" else 1
        self.register_buffer("clip", torch.ones(rows, groups, 1))
        self.scale: nn.Parameter | None = None

    def current_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return get_format(self.spec.w_format).valid(self.scale)
        return weight_scale(rows_view(weight, self.transposed), self.spec, self.clip)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = rows_view(weight, self.transposed)
        scale = self.current_scale(weight)
        blocks = grouped(rows, self.spec)
        out = get_format(self.spec.w_format).fake_quantize(blocks, scale, self.spec)
        out = out.reshape(rows.shape)
        return out.t() if self.transposed else out.reshape(weight.shape)

    def learn_scales(self, weight: torch.Tensor) -> None:
        """Turn the current scales into a trained parameter (LSQ)."""
        if self.scale is None:
            self.scale = nn.Parameter(self.current_scale(weight).detach().clone())

    def reset(self, rows: int, fan_in: int) -> None:
        """Forget clip ratios and learned scales after the weight changed shape (pruning)."""
        groups = fan_in // self.spec.group_size if self.spec.granularity == "per_group" else 1
        self.clip = torch.ones(rows, groups, 1, device=self.clip.device)
        self.scale = None

    def extra_repr(self) -> str:
        s = self.spec
        detail = f", group_size={s.group_size}" if s.granularity == "per_group" else ""
        return f"w_bits={s.w_bits}, format={s.w_format}, {s.granularity}{detail}"


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer's input to int8 levels: static (calibrated scale) or per token."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise KernelError(f"activation_mode: expected 'static' or 'dynamic', but got {mode!r}.")
        self.mode = mode
        self.register_buffer("scale", torch.ones(()))
        self.calibrated = mode == "dynamic"
        self.observer = None  # set by calibration while it runs
        self.learned: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if self.mode == "dynamic":
            scale = x.detach().abs().amax(-1, keepdim=True).clamp(min=SCALE_MIN) / ACT_QMAX
            return _fake_act(x, scale.to(torch.float32), 1.0).to(x.dtype)
        if not self.calibrated:
            raise KernelError(
                "a static activation quantizer expected calibrated ranges, but none were observed. "
                "Run compsearch.kernels.observers.calibrate(model, batches, run) first."
            )
        if self.learned is not None:
            grad_scale = 1.0 / math.sqrt(x[0].numel() * ACT_QMAX)
            return _fake_act(x, self.learned.abs().clamp(min=SCALE_MIN), grad_scale)
        return _fake_act(x, self.scale, 1.0)

    def set_scale(self, scale: float | torch.Tensor) -> None:
        value = torch.as_tensor(scale, dtype=torch.float32, device=self.scale.device)
        self.scale = value.clamp(min=SCALE_MIN).reshape(())
        self.calibrated = True
        if self.learned is not None:
            self.learned.data.copy_(self.scale)

    def learn_scales(self) -> None:
        if self.mode == "static" and self.learned is None:
            self.learned = nn.Parameter(self.scale.detach().clone())

    def current_scale(self) -> torch.Tensor:
        return (self.learned.detach().abs() if self.learned is not None else self.scale).clamp(
            min=SCALE_MIN
        )

    def extra_repr(self) -> str:
        return f"a_bits=8, mode={self.mode}"


def _fake_act(x: torch.Tensor, scale: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Symmetric int8 levels [-127, 127]. The forward value is exactly ``q * scale``; the gradient is
    straight-through inside the range, and LSQ's for a learned ``scale``."""
    v = x / scale
    q = torch.round(v).clamp(-ACT_QMAX, ACT_QMAX)
    inside = (v >= -ACT_QMAX) & (v <= ACT_QMAX)
    out = (q * scale).detach() + (x - x.detach()) * inside
    if scale.requires_grad:
        local = torch.where(inside, q - v, q).detach()
        scaled = scale * grad_scale
        out = out + local * (scaled - scaled.detach())
    return out


# -- the Quant modules -----------------------------------------------------------------------------

_float_forward = False


@contextlib.contextmanager
def float_forward():
    """Within this block Quant modules compute in float with their raw weights (for analyses that
    must see parameters, such as the pruning tracer)."""
    global _float_forward
    previous, _float_forward = _float_forward, True
    try:
        yield
    finally:
        _float_forward = previous


def in_float_forward() -> bool:
    """Whether a :func:`float_forward` block is running."""
    return _float_forward


class QuantMixin:
    """Shared by the Quant modules: ``weight_quant`` always, ``input_quant`` when ``a_bits == 8``."""

    spec: QuantSpec
    transposed_weight = False

    def _setup(self, spec: QuantSpec, weight_quant: WeightQuantizer | None = None) -> None:
        self.spec = spec
        rows = rows_view(self.weight, self.transposed_weight)
        device = self.weight.device  # quantizing a model already on its device (CUDA)
        self.weight_quant = (
            weight_quant
            or WeightQuantizer(spec, rows.shape[0], rows.shape[1], self.transposed_weight)
        ).to(device)
        self.input_quant = (
            ActQuantizer(spec.activation_mode).to(device) if spec.quantizes_input else None
        )

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if _float_forward else self.weight_quant(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None or _float_forward else self.input_quant(x)

    def on_resized(self) -> None:
        """Called by pruning after the weight changed shape."""
        rows = rows_view(self.weight, self.transposed_weight)
        self.weight_quant.reset(rows.shape[0], rows.shape[1])


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1d(QuantMixin, nn.Conv1d):
    """torch's Conv1d (audio feature encoders); GPT-2's transposed Linear is QuantConv1D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """Quantizes only the rows it looks up: scales are per row (or per group within a row), so a
    gathered row quantizes exactly as it would inside the whole table — at a fraction of the cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _float_forward:
            return F.embedding(x, self.weight, self.padding_idx)
        ids = x.reshape(-1)
        rows = F.embedding(ids, self.weight, self.padding_idx)
        quantizer = self.weight_quant
        if quantizer.scale is not None:
            scale = quantizer.current_scale(self.weight)[ids]
        else:
            scale = weight_scale(rows, quantizer.spec, quantizer.clip[ids])
        blocks = grouped(rows, quantizer.spec)
        out = get_format(quantizer.spec.w_format).fake_quantize(blocks, scale, quantizer.spec)
        return out.reshape(*x.shape, self.embedding_dim)


def conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a core dependency; this only guards odd installs
        return None
    return Conv1D


def _make_quant_conv1d():
    base = conv1d_class()
    if base is None:
        return None

    class QuantConv1D(QuantMixin, base):
        """GPT-2's Conv1D: a Linear with a transposed ``(in, out)`` weight."""

        transposed_weight = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quantized_input(x)
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.quantized_weight())
            return out.reshape(*x.shape[:-1], self.nf)

    return QuantConv1D


QuantConv1D = _make_quant_conv1d()
QUANT_TYPES: tuple[type, ...] = tuple(
    t for t in (QuantLinear, QuantConv2d, QuantConv1d, QuantEmbedding, QuantConv1D) if t is not None
)


def quant_class(module: nn.Module) -> type | None:
    """The Quant module type that replaces ``module``, or None if it is not quantizable.

    A model's own subclass of a layer (Gemma's scaled embedding, OPT's positional embedding, Falcon's
    Linear) gets a Quant class derived from it too, so it keeps its methods and attributes; where it
    has its own forward, that forward runs, seeing the fake-quantized weight as ``self.weight``.
    """
    if isinstance(module, QUANT_TYPES) or parametrize.is_parametrized(module):
        return None  # a parametrized weight (weight norm) is computed, not stored: left float
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        base = QuantConv1D
    elif isinstance(module, nn.Linear):
        base = QuantLinear
    elif isinstance(module, nn.Conv2d):
        base = QuantConv2d
    elif isinstance(module, nn.Conv1d):
        base = QuantConv1d
    elif isinstance(module, nn.Embedding):
        base = QuantEmbedding
    else:
        return None
    if type(module) in _torch_layers():
        return base
    return _derived_quant_class(base, type(module))


def as_class(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance holding ``module``'s attributes, parameters, buffers and children
    (the same tensors): how a layer becomes its Quant form without copying a weight."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def float_layer(module: nn.Module) -> nn.Module:
    """The float module a Quant module (a layer, or stacked experts) was made from: its own class,
    its weights, no quantizers."""
    base = original_class(module)
    plain = base.__new__(base)
    plain.__dict__ = module.__dict__.copy()
    plain._modules = {
        k: v
        for k, v in module._modules.items()
        if k not in ("weight_quant", "input_quant", "stack_quant")
    }
    return plain


@contextlib.contextmanager
def swapped_params(module: nn.Module, values: dict[str, torch.Tensor]):
    """Within this block ``module``'s parameters named in ``values`` read as those tensors (the
    fake-quantized weights a layer's own forward must see); the parameters are back afterwards."""
    raw = {name: module._parameters[name] for name in values}
    module._parameters.update(values)
    try:
        yield
    finally:
        module._parameters.update(raw)


def _torch_layers() -> tuple[type, ...]:
    conv1d = conv1d_class()
    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding) + ((conv1d,) if conv1d else ())


def original_class(module: nn.Module) -> type:
    """The class of the layer that compsearch's Quant or deploy class stands in for."""
    return next(
        c for c in type(module).__mro__ if not c.__module__.startswith("compsearch.kernels")
    )


def own_forward(cls: type):
    """The forward a model's own subclass of a torch layer defines, or None where it has none."""
    for klass in cls.__mro__:
        if klass in _torch_layers():
            return None
        if klass.__module__.startswith("compsearch.kernels"):
            continue
        if "forward" in vars(klass):
            return klass.forward
    return None


@functools.cache
def _derived_quant_class(base: type, user: type) -> type:
    own = own_forward(user)
    namespace = {"forward": _forward_with_quantized_weight(own)} if own is not None else {}
    return type(f"Quant{user.__name__}", (base, user), namespace)


def _forward_with_quantized_weight(own):
    def forward(self, *args, **kwargs):
        if _float_forward:
            return own(self, *args, **kwargs)
        if args and self.input_quant is not None:
            args = (self.quantized_input(args[0]), *args[1:])
        with swapped_params(self, {"weight": self.weight_quant(self._parameters["weight"])}):
            return own(self, *args, **kwargs)

    return forward


def is_quantizable(module: nn.Module) -> bool:
    return quant_class(module) is not None or isinstance(module, QUANT_TYPES)
