"""Stacked matrices: a module's own parameters of shape ``(experts, out, in)`` (the fused experts of a
mixture-of-experts layer, run through ``F.linear`` per expert or ``torch._grouped_mm``).

Each row of each expert's matrix gets its own scale (per channel) or one per group of ``in``: the
grid of an ordinary Linear, applied expert by expert. The module keeps its class and its forward;
while that forward runs, its stacked parameters are the fake-quantized ones. The deploy form holds
the dequantized matrices (``dequant``); the artifact stores the codes. See
:mod:`compsearch.kernels.quant`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils import parametrize

from compsearch.kernels._quant_grid import QuantSpec
from compsearch.kernels._quant_modules import (
    WeightQuantizer,
    as_class,
    in_float_forward,
    is_quantizable,
    own_forward,
    swapped_params,
)


def stacked_params(module: nn.Module) -> list[str]:
    """The module's own parameters that are stacks of matrices: three or more dimensions, more than
    one matrix, in a module that is not a layer compsearch quantizes otherwise (nor a convolution)."""
    skip = (nn.modules.conv._ConvNd, StackedQuantMixin, parametrize.ParametrizationList)
    if is_quantizable(module) or isinstance(module, skip):
        return []
    return [
        name
        for name, param in module.named_parameters(recurse=False)
        if param.dim() >= 3 and param.shape[0] > 1
    ]


class StackedQuantMixin:
    """Holds one weight quantizer per stacked parameter (``stack_quant``) and the spec."""

    spec: QuantSpec
    stacked: tuple[str, ...]

    def _setup_stacked(self, spec: QuantSpec, names: list[str]) -> None:
        self.spec = spec
        self.stacked = tuple(names)
        quantizers = {}
        for name in names:
            param = self._parameters[name]
            rows = param.numel() // param.shape[-1]
            quantizers[name] = WeightQuantizer(spec, rows, param.shape[-1]).to(param.device)
        self.stack_quant = nn.ModuleDict(quantizers)

    def quantized_param(self, name: str) -> torch.Tensor:
        param = self._parameters[name]
        rows = param.reshape(-1, param.shape[-1])
        return self.stack_quant[name](rows).reshape(param.shape)


def stacked_quant_class(module: nn.Module) -> type:
    user = type(module)
    return _derived(user, own_forward(user) or user.forward)


@functools.cache
def _derived(user: type, own) -> type:
    def forward(self, *args, **kwargs):
        if in_float_forward():
            return own(self, *args, **kwargs)
        with swapped_params(self, {name: self.quantized_param(name) for name in self.stacked}):
            return own(self, *args, **kwargs)

    return type(f"Quant{user.__name__}", (StackedQuantMixin, user), {"forward": forward})


def convert_stacked(module: nn.Module, spec: QuantSpec, names: list[str]) -> nn.Module:
    new = as_class(module, stacked_quant_class(module))
    new._setup_stacked(spec, names)
    return new
