"""The ONNX form of each deploy layer: the integer codes and scales compsearch stored, written as
ONNX's own quantization operators, so ONNX Runtime computes what the PyTorch deploy form computes
and its graph optimizer can fuse the pattern into an integer kernel.

* a quantized weight (int formats) is its codes (uint8 around zero point 128: see
  ``WEIGHT_ZERO_POINT``) behind a ``DequantizeLinear`` with compsearch's scales: per output channel (``axis``), or per group (``block_size``, opset 21).
  Codes of fewer than 8 bits travel as int8: compsearch's low-bit grid has no zero level
  (``w = s·(q + ½)``, stored as ``2q + 1`` at scale ``s/2``), which ONNX's int4 cannot hold.
* a static int8 input is ``QuantizeLinear → DequantizeLinear`` at the layer's own scale (uint8,
  zero point 128: the levels the oneDNN kernel reads); ONNX Runtime fuses the pair with the
  weight's ``DequantizeLinear`` and the ``MatMul`` or ``Conv`` into MatMulIntegerToFloat,
  QLinearMatMul or QLinearConv where its rules allow. ONNX saturates at level −128 where
  compsearch clamps at −127, so a Clip comes first: transformers' outlier channels saturate on
  every token, and one level of difference there moved minilm's output by 15 %.
* a per-token dynamic int8 input has no ONNX operator (``DynamicQuantizeLinear`` is per tensor):
  its levels are computed in float ops, exactly, and the matmul runs in float.
* an embedding table is its codes: looked-up rows are gathered as integers and scaled.
* a weight of a format with no integer form (fp8, a plug-in's own grid) is its float value.

:func:`onnx_form_` swaps the layers of a deploy-form copy and says, per layer, what it became.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compsearch.kernels._modules import replace_module
from compsearch.kernels._quant_grid import ACT_QMAX, SCALE_MIN
from compsearch.kernels.deploy import DeployConv2d, DeployEmbedding, DeployLinear, _post_op
from compsearch.kernels.devices import LINEAR
from compsearch.kernels.formats import get_format
from compsearch.kernels.formats.int_grid import IntFormat

#: the opset the exported graph declares: DequantizeLinear's ``block_size`` (groups) needs 21
OPSET = 21
INPUT_ZERO_POINT = 128
#: weight codes travel as uint8 around 128: ONNX Runtime's uint8 × uint8 kernels are exact on every
#: x86 CPU, where its uint8 × int8 kernels saturate 16-bit sums on CPUs without VNNI
WEIGHT_ZERO_POINT = 128


def _symbolic(op: str, inputs, attrs: dict, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=dtype, shape=shape, version=OPSET)


class _Weight(nn.Module):
    """A weight as int8 codes (rows, …) and float32 scales (rows, groups) behind a
    DequantizeLinear; ``transpose`` stores 2-D codes as (fan_in, rows), the right-hand side of a
    MatMul. Groups need 2-D codes."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, transpose: bool) -> None:
        super().__init__()
        rows, groups = scale.shape
        self.attrs: dict = {"axis": 1 if transpose else 0}
        if groups == 1:
            scale = scale.reshape(rows)
        else:  # per group: blocks along the fan-in
            block_size = codes.shape[1] // groups
            self.attrs = {"axis": 0 if transpose else 1, "block_size": block_size}
            scale = scale.t() if transpose else scale
        codes = (codes.t() if transpose else codes).to(torch.int16) + WEIGHT_ZERO_POINT
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer(
            "zero_point", torch.full(scale.shape, WEIGHT_ZERO_POINT, dtype=torch.uint8)
        )

    def forward(self) -> torch.Tensor:
        inputs = (self.codes, self.scale, self.zero_point)
        return _symbolic("DequantizeLinear", inputs, self.attrs, torch.float32, self.codes.shape)


class _Input(nn.Module):
    """A layer's int8 input levels: static (QuantizeLinear → DequantizeLinear) or per token."""

    def __init__(self, mode: str, scale: float | None) -> None:
        super().__init__()
        self.mode = mode
        if mode == "static":
            self.register_buffer("scale", torch.tensor(float(scale)))
            # compsearch's levels stop at ±127 (ONNX's uint8 saturation would allow −128); a
            # clamp at 127.5 steps would round to −128 (half to even), so it is at 127
            self.limit = float(torch.tensor(float(scale)) * ACT_QMAX)
            self.register_buffer("zero_point", torch.tensor(INPUT_ZERO_POINT, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "static":
            s = x.abs().amax(-1, keepdim=True).clamp(min=SCALE_MIN) / ACT_QMAX
            return torch.round(x / s).clamp(-ACT_QMAX, ACT_QMAX) * s
        inputs = (torch.clamp(x, -self.limit, self.limit), self.scale, self.zero_point)
        codes = _symbolic("QuantizeLinear", inputs, {}, torch.uint8, x.shape)
        inputs = (codes, self.scale, self.zero_point)
        return _symbolic("DequantizeLinear", inputs, {}, torch.float32, x.shape)


class _ReadsWeight(nn.Module):
    """Model code reads a layer's ``.weight`` (its dtype, its shape): an ONNX layer holding codes
    answers with the deploy layer's float weight, which the graph carries only where it is used."""

    def __getattr__(self, name: str):
        if name == "weight" and "float_weight" in self.__dict__:
            return self.__dict__["float_weight"]
        return super().__getattr__(name)


class OnnxLinear(_ReadsWeight):
    def __init__(self, weight: _Weight | torch.Tensor, bias, activation: _Input | None,
                 post_op: str | None, float_weight: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        if isinstance(weight, _Weight):
            self.codes = weight
            self.__dict__["float_weight"] = float_weight
        else:
            self.register_buffer("weight", weight.t().contiguous())  # float: (in, out)
        self.activation, self.post_op = activation, post_op
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = self.activation(x)
        weight = self.codes() if "codes" in self._modules else self.weight
        out = torch.matmul(x, weight)
        if self.bias is not None:
            out = out + self.bias
        return _post_op(out, self.post_op)


class OnnxConv(_ReadsWeight):
    def __init__(self, layer: DeployConv2d, weight: _Weight | torch.Tensor,
                 activation: _Input | None) -> None:  # fmt: skip
        super().__init__()
        if isinstance(weight, _Weight):
            self.codes = weight
            self.__dict__["float_weight"] = layer.weight
        else:
            self.register_buffer("weight", weight)
        self.shape = tuple(layer.weight.shape)
        self.activation = activation
        self.bias = layer.bias
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = self.activation(x)
        weight = self.codes().reshape(self.shape) if "codes" in self._modules else self.weight
        conv = F.conv1d if len(self.shape) == 3 else F.conv2d
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OnnxEmbedding(_ReadsWeight):
    """An embedding table as its codes: the looked-up rows are gathered as integers and scaled
    (Gather, Cast, Sub, Mul), as the ``int8_gather`` kernel does; the table is never dequantized."""

    def __init__(self, layer: DeployEmbedding, codes) -> None:
        super().__init__()
        if codes is None:
            self.register_buffer("weight", layer.weight)
        else:
            rows, scale = codes
            shifted = (rows.to(torch.int16) + WEIGHT_ZERO_POINT).to(torch.uint8)
            self.register_buffer("codes", shifted.contiguous())
            self.register_buffer("scale", scale.float().contiguous())
            self.__dict__["float_weight"] = layer.weight
        self.padding_idx = layer.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if "codes" not in self._buffers:
            return F.embedding(ids, self.weight, self.padding_idx)
        rows = F.embedding(ids, self.codes).float() - WEIGHT_ZERO_POINT
        scale = F.embedding(ids, self.scale)
        width = rows.shape[-1]
        grouped = rows.reshape(*rows.shape[:-1], scale.shape[-1], -1) * scale.unsqueeze(-1)
        return grouped.reshape(*rows.shape[:-1], width)


def runs_on_integer_kernel(kind: str, spec) -> bool:
    """ONNX Runtime fuses this layer's ONNX form into an integer kernel (MatMulIntegerToFloat): a
    Linear with static int8 inputs and int codes per output channel. (A search space offers int8
    inputs where this holds; each export reports what ONNX Runtime actually did.)"""
    return (
        kind == LINEAR
        and spec.a_bits == 8
        and spec.activation_mode == "static"
        and spec.granularity == "per_channel"
        and isinstance(get_format(spec.w_format), IntFormat)
    )


def _codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's int8 codes (rows, fan_in) and scales (rows, groups), or None (no int form)."""
    buffers = layer._buffers
    if "row_scale" in buffers:  # int8_gather
        return buffers["codes"], buffers["row_scale"].float()
    if "codes" in buffers:  # oneDNN / int_mm: per output channel, padded for int_mm
        rows, fan_in = layer.out_features, layer.in_features
        codes = buffers["codes"][:rows, :fan_in]
        return codes, buffers["w_scale"][:rows].float().reshape(rows, 1)
    packed = getattr(layer, "packed", None)
    if packed is None or not isinstance(get_format(packed.spec.w_format), IntFormat):
        return None
    return packed.int8_codes()


def _describe(codes, activation: _Input | None, embedding: bool = False) -> str:
    weight = "codes → DequantizeLinear" if codes is not None else "float weight"
    if embedding and codes is not None:
        return "codes, gathered rows scaled"
    if activation is None:
        return weight
    inputs = (
        "QuantizeLinear/DequantizeLinear"
        if activation.mode == "static"
        else "per-token levels in float ops"
    )
    return f"{weight}; int8 inputs: {inputs}"


def onnx_form_(model: nn.Module) -> dict[str, str]:
    """Swap every deploy layer of ``model`` (a copy: it is changed in place) for its ONNX form;
    returns, per layer, what it became. A layer that runs its model's own forward keeps it (on
    its float weight), and says so."""
    forms: dict[str, str] = {}
    for name, layer in list(model.named_modules()):
        kind = type(layer)
        if kind not in (DeployLinear, DeployConv2d, DeployEmbedding):
            if isinstance(layer, (DeployLinear, DeployConv2d, DeployEmbedding)):
                forms[name] = "float weight, in the model's own forward"
            continue
        codes = _codes(layer)
        mode = getattr(layer, "activation_mode", None)
        activation = None if mode is None else _Input(mode, layer.input_scale)
        if kind is DeployLinear:
            weight = layer.weight if codes is None else _Weight(*codes, transpose=True)
            new = OnnxLinear(weight, layer.bias, activation, layer.post_op, layer.weight)
        elif kind is DeployConv2d:
            if codes is None:
                weight = layer.weight
            elif codes[1].shape[1] == 1:  # per output channel: DequantizeLinear on the 4-D codes
                weight = _Weight(codes[0].reshape(layer.weight.shape), codes[1], False)
            else:
                weight = _Weight(*codes, transpose=False)
            new = OnnxConv(layer, weight, activation)
        else:
            new = OnnxEmbedding(layer, codes)
        replace_module(model, layer, new)
        forms[name] = _describe(codes, activation, kind is DeployEmbedding)
    return forms
