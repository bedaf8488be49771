"""Operator fusion, found by watching one forward pass rather than by model-specific rules.

* :func:`fold_batchnorm_` — Conv2d → BatchNorm2d pairs become one Conv2d with bias (before
  quantization, so the quantized weight is the folded one, as it ships).
* :func:`fuse_activation_chains_` — int8 Linear → activation → int8 Linear chains run the activation
  inside the first kernel, whose uint8 output feeds the second without a float round trip.

A pair is fused only when the second module received exactly the tensor the first produced (same
object, seen through forward hooks) and, for an activation, the activation module ran once. After
fusing, the model is run again and its output compared with the unfused one; a mismatch raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels._modules import replace_by_name

Run = Callable[[nn.Module], Any]

ACTIVATIONS: dict[str, str] = {
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
}


def activation_name(module: nn.Module) -> str | None:
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return ACTIVATIONS.get(type(module).__name__)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Trace:
    """Records, for chosen modules, the tensor object each received and produced, and call counts."""

    def __init__(self, model: nn.Module, want: Callable[[nn.Module], bool]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name and want(module):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            first_in, first_out = _first_tensor(args), _first_tensor(output)
            if first_in is not None:
                self.inputs[name] = first_in
            if first_out is not None:
                self.outputs[name] = first_out

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def fed_by(self, consumer: str, producers: dict[str, torch.Tensor]) -> str | None:
        tensor = self.inputs.get(consumer)
        for name, output in producers.items():
            if tensor is not None and output is tensor:
                return name
        return None


def _compare(before: Any, after: Any, tolerance: float, what: str) -> None:
    a, b = _first_tensor(_main(before)), _first_tensor(_main(after))
    if a is None or b is None:
        return
    error = float((a.float() - b.float()).norm() / a.float().norm().clamp(min=1e-12))
    if error > tolerance:
        raise KernelError(
            f"{what} changed the model's output (relative error {error:.2e} > {tolerance:.0e}); "
            "a fused pair was not a plain chain. Please report the model's architecture."
        )


def _main(output: Any) -> Any:
    for attribute in ("logits", "embedding", "last_hidden_state"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    return output


@contextlib.contextmanager
def exact_float32():
    """Float32 math without TF32 on CUDA (on by default for cuDNN convolutions), so an exactness
    check measures the change it checks, not TF32's rounding (1.7e-4 on an H200)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@torch.no_grad()
def fold_batchnorm_(model: nn.Module, run: Run) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d into it. Returns the folded pairs."""
    was_training = model.training
    model.eval()
    trace = _Trace(model, lambda m: isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
    try:
        with exact_float32():
            before = run(model)
    finally:
        trace.close()
    convs = {
        n: t for n, t in trace.outputs.items() if isinstance(model.get_submodule(n), nn.Conv2d)
    }
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and trace.calls.get(name) == 1:
            conv = trace.fed_by(name, convs)
            if conv is not None and trace.calls.get(conv) == 1:
                pairs.append((conv, name))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        replace_by_name(model, conv_name, _folded(conv, bn))
        replace_by_name(model, bn_name, nn.Identity())
    if pairs:
        with exact_float32():
            after = run(model)
        _compare(before, after, 1e-4, "folding BatchNorm into Conv2d")
    model.train(was_training)
    return pairs


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, batches, run_batch) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average).

    After pruning, the statistics a BatchNorm kept no longer describe its (pruned) input; refreshing
    them is cheap and recovers much of the loss. Returns how many norms were refreshed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for batch in batches:
            run_batch(model, batch)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * factor + bn.bias)
    return fused


@torch.no_grad()
def fuse_activation_chains_(model: nn.Module, run: Run) -> list[tuple[str, str, str]]:
    """Fuse int8 Linear → activation → int8 Linear chains (oneDNN kernels). Returns the chains.

    Each chain is checked on the input its first layer saw in the traced forward: fused and unfused,
    the second layer's output must agree (1e-2 relative), or the chain is left unfused. The check is
    local on purpose — a model whose static int8 activations amplify small differences would fail
    an end-to-end comparison for reasons that have nothing to do with the fusion.
    """

    def int8(module: nn.Module) -> bool:  # a deploy-form linear on oneDNN's int8 kernel
        return getattr(module, "kernel", None) == "onednn_qlinear" and hasattr(module, "post_op")

    trace = _Trace(model, lambda m: int8(m) or activation_name(m) is not None)
    try:
        run(model)
    finally:
        trace.close()
    producers = {
        n: t
        for n, t in trace.outputs.items()
        if int8(model.get_submodule(n)) and trace.calls[n] == 1
    }
    activations = {
        n: t
        for n, t in trace.outputs.items()
        if activation_name(model.get_submodule(n)) and trace.calls[n] == 1
    }
    chains = []
    for consumer, module in model.named_modules():
        if not int8(module) or trace.calls.get(consumer) != 1:
            continue
        act = trace.fed_by(consumer, activations)
        producer = trace.fed_by(act, producers) if act else None
        if producer is None or model.get_submodule(producer).post_op is not None:
            continue
        first, activation = model.get_submodule(producer), model.get_submodule(act)
        x = trace.inputs[producer]
        unfused = module(activation(first(x)))
        first.post_op = activation_name(activation)
        first.output_scale = module.input_scale
        fused = module(first(x))
        error = float((fused - unfused).norm() / unfused.norm().clamp(min=1e-12))
        if error > 1e-2:
            first.post_op, first.output_scale = None, None
            continue
        chains.append((producer, act, consumer))
    activations_of = {act: model.get_submodule(act) for _, act, _ in chains}
    for act in activations_of:
        replace_by_name(model, act, nn.Identity())
    return _unfuse_what_model_code_changes(model, run, chains, activations_of)


def _unfuse_what_model_code_changes(model, run, chains, activations_of) -> list:
    """A fused consumer must receive its producer's uint8 codes as they are; model code between
    them can change them (T5 casts its MLP's hidden states to the weight's dtype), which the local
    check cannot see. One more forward finds such chains; they are unfused."""
    if not chains:
        return []
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, args[0].dtype)

        return hook

    handles = [
        model.get_submodule(consumer).register_forward_pre_hook(record(consumer))
        for _, _, consumer in chains
    ]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    kept = []
    for producer, act, consumer in chains:
        if seen.get(consumer) == torch.uint8:
            kept.append((producer, act, consumer))
            continue
        first = model.get_submodule(producer)
        first.post_op, first.output_scale = None, None
        replace_by_name(model, act, activations_of[act])
    return kept
