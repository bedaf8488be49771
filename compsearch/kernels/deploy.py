"""Deploy forms: the modules that ship, built from packed weights, running real low-precision kernels.

Which kernel serves which format on which device is a queryable table (:func:`deploy_table`,
:func:`kernel_for`). ``fast`` in the table means a real low-precision kernel does the work; every
other format is stored packed (its size is real) and dequantized to float at load, so its speed is
float speed — latency measurement shows that as it is.

Kernels:

* ``onednn_qlinear`` — x86 CPU: oneDNN int8 GEMM (``torch.ops.onednn.qlinear_pointwise``) on a
  prepacked weight, static per-tensor activation scale, bias and scales fused, optional fused
  activation (GELU / ReLU) and uint8 output straight into the next int8 layer (see
  :mod:`compsearch.kernels.fuse`).
* ``int_mm`` — CPU and CUDA: ``torch._int_mm`` (int8 × int8 → int32) with per-token dynamic (or
  static) activation scales and per-channel weight scales.
* ``fp8_scaled_mm`` — CUDA with compute capability ≥ 8.9: ``torch._scaled_mm`` on float8 e4m3
  weights and per-token float8 activations.
* ``int8_gather`` — embeddings: rows gathered from the int8 table, then scaled.
* ``dequant`` — the float weight rebuilt from the packed codes; float compute.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from compsearch.kernels._act_codes import (
    input_qdq,
    per_token_scale,
    quantize_s8,
    quantize_u8_static,
)
from compsearch.kernels._modules import replace_module
from compsearch.kernels.devices import (
    CONV2D,
    EMBEDDING,
    LINEAR,
)
from compsearch.kernels.formats import FORMATS, get_format
from compsearch.kernels.packing import PackedWeight
from compsearch.kernels.quant import (
    FP8_MAX,
    SCALE_MIN,
    QuantSpec,
    StackedQuantMixin,
    float_layer,
    original_class,
    own_forward,
)


@dataclass(frozen=True)
class FormatSupport:
    """One row of the deploy table: a layer kind and format, and the kernel that runs it."""

    layer: str
    w_bits: str  # "2-7", "8", "2-8" or "16"
    w_format: str
    a_bits: int
    granularity: str
    kernel: str
    fast: bool


def kernel_for(layer: str, spec: QuantSpec, device_type: str) -> str:
    """The kernel that runs ``spec`` for a ``layer`` kind on ``device_type`` ('cpu' or 'cuda'):
    the weight format's choice (see compsearch.kernels.formats)."""
    if not spec.quantizes_weight:
        return "float"
    return get_format(spec.w_format).kernel(layer, spec, device_type)


FAST_KERNELS = frozenset({"onednn_qlinear", "int_mm", "fp8_scaled_mm", "int8_gather"})


def deploy_table(device_type: str = "cpu") -> list[FormatSupport]:
    """Every (layer kind, registered format) and the kernel that serves it on ``device_type``."""
    shapes = [("8", 8, "per_channel"), ("2-7", 4, "per_channel"), ("8", 8, "per_group"),
              ("2-7", 4, "per_group")]  # fmt: skip
    activations = [(8, "static"), (8, "dynamic"), (16, "static")]
    rows = []
    for layer, (name, fmt), (label, bits, granularity), (a_bits, mode) in itertools.product(
        (LINEAR, CONV2D, EMBEDDING), FORMATS.items(), shapes, activations
    ):
        if layer == EMBEDDING and a_bits == 8:
            continue
        spec = QuantSpec(
            w_bits=bits,
            a_bits=a_bits,
            granularity=granularity,
            group_size=32 if granularity == "per_group" else None,
            w_format=name,
            activation_mode=mode,
        )
        if fmt.check(spec) or granularity not in fmt.offered:
            continue  # not a width or granularity this format offers (fp8: 8 bits, per channel)
        kernel = kernel_for(layer, spec, device_type)
        shown = granularity + (f", a8 {mode}" if a_bits == 8 else "")
        rows.append(
            FormatSupport(layer, label, name, a_bits, shown, kernel, kernel in FAST_KERNELS)
        )
    return rows


_ONEDNN_POST_OPS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


# -- deploy modules --------------------------------------------------------------------------------


class DeployLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) running one of the int8 / fp8 kernels, or dequantized float.

    ``post_op`` (``relu``, ``gelu``, ``gelu_tanh``) and ``output_scale`` are set by the fusion pass:
    the activation that followed this layer runs inside the kernel, and with ``output_scale`` the
    output is uint8 codes for the next int8 layer, which reads them without re-quantizing.
    """

    def __init__(
        self,
        packed: PackedWeight,
        bias: torch.Tensor | None,
        kernel: str,
        input_scale: float | None,
        activation_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.spec = packed.spec
        self.activation_mode = activation_mode  # a8 inputs: "static" / "dynamic"; None: float
        self.out_features, self.in_features = packed.rows_shape
        self.transposed = packed.transposed  # GPT-2's Conv1D keeps its weight as (in, out)
        self.input_scale = input_scale
        if kernel == "int_mm" and input_scale is not None:  # a tensor made per call breaks capture
            self.register_buffer("input_scale_t", torch.tensor(input_scale), persistent=False)
        self.post_op: str | None = None
        self.output_scale: float | None = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self._onednn_weight = None
        self.packed = None  # the stored form, kept where the layer computes in float (exports)
        if kernel in ("onednn_qlinear", "int_mm"):
            codes, scale = packed.int8_codes()
            if kernel == "int_mm":  # cuBLAS int8 GEMM: both weight dimensions multiples of 8
                codes = F.pad(codes, (0, -codes.shape[1] % 8, 0, -codes.shape[0] % 8))
            self.register_buffer("codes", codes.contiguous())
            self.register_buffer("w_scale", scale.reshape(-1).contiguous())
        elif kernel == "fp8_scaled_mm":
            self.register_buffer("fp8_weight", packed.data.contiguous())
            self.register_buffer("w_scale", packed.scale.float().reshape(1, -1))
        else:
            weight = packed.dequantize()
            self.register_buffer("weight", weight.t() if packed.transposed else weight)
            self.packed = packed

    def _apply(self, fn, recurse=True):
        self._onednn_weight = None  # re-pack for the new device / dtype
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str):
        if name == "weight" and "weight" not in self._buffers:
            return _float_weight(self)
        return super().__getattr__(name)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_onednn_weight"] = None  # an opaque prepacked tensor: rebuilt on first use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "onednn_qlinear":
            return self._onednn(x)
        if self.kernel == "int_mm":
            out = self._int_mm(x)
        elif self.kernel == "fp8_scaled_mm":
            out = self._fp8(x)
        else:
            x = input_qdq(x, self.activation_mode, self.input_scale)
            out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias)
        return _post_op(out, self.post_op)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn_weight is None:
            self._onednn_weight = torch.ops.onednn.qlinear_prepack(self.codes, None)
            self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
        codes = x if x.dtype == torch.uint8 else quantize_u8_static(x, self.input_scale)
        name, algorithm = _ONEDNN_POST_OPS.get(self.post_op, ("none", ""))
        if self.output_scale is not None:
            out_scale, out_zero, out_dtype = self.output_scale, 128, torch.uint8
        else:
            out_scale, out_zero, out_dtype = 1.0, 0, dtype
        return torch.ops.onednn.qlinear_pointwise(
            codes, self.input_scale, 128, self._onednn_weight, self.w_scale, self._zero_points,
            self.bias, out_scale, out_zero, out_dtype, name, [], algorithm,
        )  # fmt: skip

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            scale = self.input_scale_t
        else:
            scale = per_token_scale(flat)
        codes = quantize_s8(flat.float(), scale)
        rows = codes.shape[0]
        # cuBLAS int8 GEMM needs more than 16 rows; the fan-in is padded like the weight's
        more_rows = 17 - rows if x.is_cuda and rows <= 16 else 0
        more_columns = self.codes.shape[1] - codes.shape[1]
        if more_rows or more_columns:
            codes = F.pad(codes, (0, more_columns, 0, more_rows))
        acc = torch._int_mm(codes, self.codes.t())[:rows, : self.out_features]
        out = acc.float().mul_(scale).mul_(self.w_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scale = flat.abs().amax(-1, keepdim=True).float().clamp_(min=SCALE_MIN) / FP8_MAX
        codes = (flat.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            codes,
            self.fp8_weight.t(),
            scale_a=scale,
            scale_b=self.w_scale,
            bias=None if self.bias is None else self.bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
        )
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        fused = f", post_op={self.post_op}" if self.post_op else ""
        chained = ", uint8 output" if self.output_scale is not None else ""
        return (
            f"{self.in_features}→{self.out_features}, w_bits={self.spec.w_bits}, "
            f"kernel={self.kernel}{fused}{chained}"
        )


def _post_op(x: torch.Tensor, post_op: str | None) -> torch.Tensor:
    if post_op is None:
        return x
    if post_op == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if post_op == "gelu_tanh" else "none")


class DeployConv2d(nn.Module):
    """A Conv2d (or Conv1d: a 3-D weight) whose weight was stored packed and is dequantized to
    float (``dequant`` kernel)."""

    def __init__(
        self,
        packed: PackedWeight,
        conv: nn.Conv2d,
        bias: torch.Tensor | None,
        input_scale: float | None = None,
        activation_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.kernel = "dequant"
        self.spec = packed.spec
        self.input_scale, self.activation_mode = input_scale, activation_mode
        self.register_buffer("weight", packed.dequantize())
        self.packed = packed  # the stored form (exports)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        # what code around a Conv2d reads (e.g. TF-style "same" padding from kernel_size)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding_mode = conv.kernel_size, conv.padding_mode
        self.transposed, self.output_padding = False, conv.output_padding
        if conv.padding_mode != "zeros":
            raise NotImplementedError("deploy conv supports zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = input_qdq(x, self.activation_mode, self.input_scale)
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        conv = F.conv1d if weight.dim() == 3 else F.conv2d  # nn.Conv1d's weights are 3-D
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"w_bits={self.spec.w_bits}, kernel=dequant"


class DeployEmbedding(nn.Module):
    """An embedding table kept as int8 codes; looked-up rows are scaled to float."""

    def __init__(self, packed: PackedWeight, embedding: nn.Embedding, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel
        self.spec = packed.spec
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = packed.rows_shape
        self.packed = None if kernel == "int8_gather" else packed  # the stored form (exports)
        if kernel == "int8_gather":
            codes, scale = packed.int8_codes()
            self.register_buffer("codes", codes)
            self.register_buffer("row_scale", scale)  # (rows, groups)
        else:
            self.register_buffer("weight", packed.dequantize())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel != "int8_gather":
            return F.embedding(ids, self.weight, self.padding_idx)
        rows = F.embedding(ids, self.codes).float()
        scale = F.embedding(ids, self.row_scale)
        groups = scale.shape[-1]
        rows = rows.reshape(*rows.shape[:-1], groups, -1) * scale.unsqueeze(-1)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def __getattr__(self, name: str):
        if name == "weight" and "weight" not in self._buffers:
            return _float_weight(self)
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}×{self.embedding_dim}, w_bits={self.spec.w_bits}, kernel={self.kernel}"


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a deploy layer serves, for code that reads ``.weight`` (its shape, dtype,
    device; a model's forward that indexes it): computed from the stored codes on each access, so
    the layer keeps only its compact form."""
    buffers = module._buffers
    if "fp8_weight" in buffers:
        weight = buffers["fp8_weight"].float() * buffers["w_scale"].reshape(-1, 1)
        return weight.t() if module.transposed else weight
    if "codes" in buffers and "row_scale" in buffers:  # int8_gather: per-row or per-group scales
        codes, scale = buffers["codes"].float(), buffers["row_scale"]
        rows = codes.reshape(codes.shape[0], scale.shape[-1], -1) * scale.unsqueeze(-1)
        return rows.reshape(codes.shape)
    if "codes" in buffers:  # int8 linear: per-output-channel scales, padded for int_mm
        out_features, in_features = module.out_features, module.in_features
        codes = buffers["codes"][:out_features, :in_features].float()
        weight = codes * buffers["w_scale"][:out_features].reshape(-1, 1)
        return weight.t() if module.transposed else weight
    raise AttributeError(f"{type(module).__name__} holds no weight")


# -- building the deploy form ----------------------------------------------------------------------


@dataclass
class DeployReport:
    """Which kernel serves each quantized layer, and the activation chains that were fused."""

    kernels: dict[str, str]
    chains: list[tuple[str, str, str]]


def layer_kind(module: nn.Module) -> str:
    from compsearch.kernels.quant import conv1d_class

    conv1d = conv1d_class()
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return CONV2D  # convolutions: a dequantized weight, whatever their dimensions
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return LINEAR
    raise TypeError(f"not a quantizable layer: {type(module).__name__}")


def build_deploy(
    skeleton: nn.Module, packed, device: str | torch.device = "cpu", run=None
) -> tuple[nn.Module, DeployReport]:
    """Turn ``skeleton`` (the model's architecture, float or fake-quant) into its deploy form.

    ``packed`` is a :class:`~compsearch.kernels.packing.PackedModel`. Float tensors are loaded into
    the skeleton with the same key check as ``load_state_dict(strict=True)``; each packed layer is
    replaced by its deploy module. With ``run(model)``, float Conv2d → BatchNorm pairs are folded and
    activation chains fused (both checked against the unfused output).
    """
    from compsearch.errors import KernelError
    from compsearch.kernels.fuse import fold_batchnorm_, fuse_activation_chains_
    from compsearch.kernels.quant import QUANT_TYPES

    device = torch.device(device)
    stacked = {name for name, weight in packed.weights.items() if weight.stacked}
    quantized = (set(packed.weights) | set(packed.ties)) - stacked
    state_keys = set()
    for key in skeleton.state_dict():
        owner, _, leaf = key.rpartition(".")
        if any(f".{q}." in f".{key}" for q in ("weight_quant", "input_quant", "stack_quant")):
            continue
        if (leaf == "weight" and owner in quantized) or key in stacked:
            continue
        state_keys.add(key)
    missing = sorted(state_keys - set(packed.floats))
    unexpected = sorted(set(packed.floats) - state_keys)
    if missing or unexpected:
        raise KernelError(
            "the artifact does not fit this architecture: expected exactly its tensors, but "
            f"{len(missing)} are missing (e.g. {missing[:3]}) and {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}). Rebuild the architecture from the artifact's recipe."
        )
    skeleton.load_state_dict(packed.floats, strict=False)
    kernels: dict[str, str] = {}
    for name in sorted(quantized):
        source = packed.ties.get(name, name)
        weight = packed.weights[source]
        module = skeleton.get_submodule(name)
        kind = layer_kind(module)
        own = own_forward(original_class(module))
        # a layer with its own forward runs it on the dequantized weight
        kernel = "dequant" if own is not None else kernel_for(kind, weight.spec, device.type)
        bias = getattr(module, "bias", None)
        scale, mode = packed.input_scales.get(name), packed.activation_modes.get(name)
        if kind == EMBEDDING:
            new = DeployEmbedding(weight, module, kernel)
        elif kind == CONV2D:
            new = DeployConv2d(weight, module, bias, scale, mode)
        else:
            new = DeployLinear(weight, bias, kernel, scale, mode)
        if own is not None:
            new = _with_own_forward(new, module)
        replace_module(skeleton, module, new)
        kernels[name] = kernel
    for name in sorted(stacked):  # experts: their own forward on the dequantized matrices
        _set_stacked(skeleton, name, packed.weights[name])
        kernels[name] = "dequant"
    for name, module in list(skeleton.named_modules()):
        if isinstance(module, QUANT_TYPES):  # a8 with float weight: ships as a float layer
            replace_module(skeleton, module, float_layer(module))
            kernels[name] = "float"
    model = skeleton.to(device).eval().requires_grad_(False)
    if run is not None:
        fold_batchnorm_(model, run)  # float convs still followed by a norm (a teacher, say)
    if any(isinstance(m, (nn.Conv2d, DeployConv2d)) for m in model.modules()):
        # convolutions run faster on NHWC tensors (measured: about 10 % on the mnist ResNet, CPU)
        model = model.to(memory_format=torch.channels_last)
    chains = fuse_activation_chains_(model, run) if run is not None else []
    return model, DeployReport(kernels, chains)


def _set_stacked(skeleton: nn.Module, name: str, weight: PackedWeight) -> None:
    owner_name, _, param = name.rpartition(".")
    owner = skeleton.get_submodule(owner_name)
    if isinstance(owner, StackedQuantMixin):  # the fake-quant model as skeleton
        plain = float_layer(owner)
        replace_module(skeleton, owner, plain)
        owner = plain
    owner._parameters[param] = nn.Parameter(weight.dequantize(), requires_grad=False)


def _with_own_forward(new: nn.Module, module: nn.Module) -> nn.Module:
    """``new`` (a deploy layer) as an instance of the model's own layer class, whose forward it
    runs: the deploy layer's weight and bias, the original's other attributes and buffers."""
    user = original_class(module)
    cls = _derived_deploy_class(type(new), user, own_forward(user))
    made = cls.__new__(cls)
    made.__dict__ = new.__dict__.copy()
    for key, value in module.__dict__.items():
        made.__dict__.setdefault(key, value)
    for key, buffer in module._buffers.items():
        if key != "weight" and key not in made._parameters:
            made._buffers.setdefault(key, buffer)
    return made


@functools.cache
def _derived_deploy_class(deploy: type, user: type, own) -> type:
    def forward(self, *args, **kwargs):
        mode = getattr(self, "activation_mode", None)  # embeddings read ids: no a8
        if args and mode is not None:
            args = (input_qdq(args[0], mode, self.input_scale), *args[1:])
        return own(self, *args, **kwargs)

    return type(f"Deploy{user.__name__}", (deploy, user), {"forward": forward})


def to_deploy(
    model: nn.Module, device: str | torch.device = "cpu", run=None
) -> tuple[nn.Module, DeployReport]:
    """The deploy form of a fake-quant ``model`` (left untouched), via the same packed weights an
    artifact stores, so a saved and reloaded artifact behaves exactly like this."""
    import copy

    from compsearch.kernels.packing import export_packed

    packed = export_packed(model)
    return build_deploy(copy.deepcopy(model), packed, device, run)
