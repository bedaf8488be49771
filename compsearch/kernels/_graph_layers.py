"""The tracer's handlers for layers that own channels: Linear, Conv, Embedding, norms.

A mixin of :class:`compsearch.kernels._graph_tracer.Tracer`; see :mod:`compsearch.kernels.graph`.
"""

from __future__ import annotations

import torch

from compsearch.kernels._graph_spaces import ChannelSpace, Layout, Member, TensorInfo


class LayerOps:
    def layer_out(self, key: str, size: int, dim: int) -> ChannelSpace:
        """The space of dimension ``dim`` of weight ``key``: one per tensor and dimension, however
        many modules share the tensor (BART's encoder and decoder embeddings are one table)."""
        cache = (self.canonical[key], dim)
        space = self.layer_spaces.get(cache)
        layer = self.trace.module_of_key[key]
        if layer not in self.trace.order:
            self.trace.order.append(layer)
        if space is None:
            space = self.layer_spaces[cache] = self.space(size)
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
        space = self.layer_out(weight_key, size, dim)
        space.members.add(Member(weight_key, dim, 0, size, "out"))
        bias_key = self.layer_key(bias)
        if bias_key:
            space.members.add(Member(bias_key, 0, 0, size, "out"))
        self.put(out, TensorInfo(Layout(channel_dim, (space,))))

    def op_linear(self, out, x, weight, bias=None) -> None:
        key = self.layer_key(weight)
        if key is None:
            return self.unknown(out, "linear with a computed weight", [x], [self.get(x)])
        self.consume(x, key, 1, "linear")
        self.produce(out, key, 0, bias, weight.shape[0], out.dim() - 1)

    def op_matmul(self, out, x, other) -> None:
        """``x @ W.T`` (Falcon's Linear) is a linear layer; other products follow nothing."""
        origin = self.get(other).origin
        if origin is None or other.dim() != 2 or None in origin[1] or self.get(x).origin:
            return self.unknown(out, "matmul", [x, other], [self.get(x), self.get(other)])
        key, (fan_in, fan_out) = origin
        self.consume(x, key, fan_in, "linear")
        self.produce(out, key, fan_out, None, other.shape[1], out.dim() - 1)

    def op_addmm(self, out, bias, x, weight, **kwargs) -> None:  # GPT-2 Conv1D: x @ W + b
        key = self.layer_key(weight)
        if key is None:
            return self.unknown(out, "addmm", [x], [self.get(x)])
        self.consume(x, key, 0, "linear")
        self.produce(out, key, 1, bias, weight.shape[1], out.dim() - 1)

    def op_conv2d(self, out, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        key = self.layer_key(weight)
        info = self.get(x)
        if key is None:
            return self.unknown(out, "conv2d with a computed weight", [x], [info])
        channels = x.shape[1]
        if groups == 1:
            self.consume(x, key, 1, "conv")
            return self.produce(out, key, 0, bias, weight.shape[0], 1)
        if groups == channels and weight.shape[0] == channels and info.layout is not None:
            bias_key = self.layer_key(bias)
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
        self.layer_spaces[(self.canonical[key], 0)].block("grouped convolution")

    op_conv1d = op_conv2d  # the same channel layout: (batch, channels, ...)

    def op_embedding(self, out, ids, weight, *args, **kwargs) -> None:
        key = self.layer_key(weight)
        if key is None:
            return
        space = self.layer_out(key, weight.shape[1], 1)
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
