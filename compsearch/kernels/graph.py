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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compsearch.kernels._graph_spaces import (  # noqa: F401 - the public names of the analysis
    Attention,
    Block,
    ChannelSpace,
    HeadSplit,
    Layout,
    Member,
    TensorInfo,
    Trace,
    union,
)
from compsearch.kernels._graph_tracer import Tracer as _Tracer
from compsearch.kernels._graph_tracer import _tensors

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
        queries = {trace.splits.index(s) for s in attention.q}
        attention.head_params = sorted(
            {(key, dim) for lineage, key, dim in trace.head_params if lineage & queries}
        )
        attention.blocked_by = sorted(
            {why for lineage, why in trace.head_blocks if lineage & queries}
        )
        for lineage, space in trace.head_spaces:
            if lineage & queries and space.find().size == attention.q_heads:
                attention.head_spaces.append(space.find())
            elif lineage & queries:
                space.block("an attention mask whose head count is not the attention's")
        trace.attentions.append(attention)
    for split in trace.splits:
        if not split.claimed:
            split.space.block("split into heads that no output projection reads")


def _attention(layer: str, out_space: ChannelSpace, splits: list[HeadSplit]) -> Attention | None:
    if len(splits) == 1:
        return _fused_attention(layer, out_space, splits[0])
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


def _fused_attention(layer: str, out_space: ChannelSpace, split: HeadSplit) -> Attention | None:
    """One projection split into heads that each carry their query, key and value (GPT-NeoX's
    ``view(..., heads, 3 * head_dim)`` then ``chunk``): each head's slice of the fused rows is
    pruned whole, with the head's columns of the output projection. Or only the queries are split
    (one key/value head, never split: multi-query attention, Gemma): query heads are pruned with
    their output columns, the shared key and value stay."""
    heads = split.heads
    if heads < 2 or out_space.size % heads:
        return None
    head_dim = out_space.size // heads
    if split.head_dim % head_dim:
        return None
    attention = Attention(split.owner, [split], [], out_space, layer, heads, heads, head_dim)
    if split.head_dim == head_dim:
        attention.queries_only = True
    else:
        attention.fused_width = split.head_dim
    return attention


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)
