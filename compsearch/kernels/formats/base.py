"""The weight-format extension point: one class per family of weight grids.

A :class:`WeightFormat` says everything that differs between families — ``int`` (integer grids,
2–8 bits, per channel or per group) and ``fp8`` (float8 e4m3) are the built-ins:

* its grid: the largest level in scale units (:meth:`max_level`) and the fake quantization that
  training sees (:meth:`fake_quantize`, straight-through gradients);
* its stored form: :meth:`pack` turns weight rows into the one tensor an artifact stores under
  ``<layer>.weight.<stored_suffix>`` (float16 scales beside it), :meth:`unpack` reads it back
  bit-equal to the fake-quant weight;
* its deploy kernel on a device for a layer kind (:meth:`kernel`; ``dequant`` = stored packed,
  computed in float: it saves size, not time);
* its choices in a search space (``offered`` granularities, ``weight_only``, :meth:`check`) and
  their short labels (:meth:`label`).

Register an instance with :func:`compsearch.kernels.formats.register_format`; recipes then name it
by ``w_format``. Lifecycle of one layer: quantize (``check`` → ``max_level``/``fake_quantize`` in
every forward) → pack → deploy (``kernel``; ``unpack`` where the kernel computes in float).
"""

from __future__ import annotations

import abc

import torch

from compsearch.kernels._quant_grid import SCALE_MIN, QuantSpec


class WeightFormat(abc.ABC):
    name: str
    stored_suffix: str
    #: whether the MSE observer may search a per-row clip for this grid
    clip_search: bool = False
    #: the granularities the deploy table and search spaces offer (a recipe may ask for others)
    offered: tuple[str, ...] = ("per_channel", "per_group")
    #: whether a space offers it with float activations (stored packed, computed in float)
    weight_only: bool = True

    #: numbers per group in the scale tensor ``(rows, groups, width)``: 1 (a scale), or more for
    #: formats with further per-group parameters (``affine``: scale and minimum)
    scale_width: int = 1

    def scales(
        self, blocks: torch.Tensor, clip: torch.Tensor | None, spec: QuantSpec
    ) -> torch.Tensor:
        """The per-group parameters ``(rows, groups, scale_width)`` of weights ``(rows, groups,
        group)``: here the absolute maximum (times its clip factor, from the MSE observer) over
        the grid's largest level."""
        amax = blocks.detach().abs().amax(-1, keepdim=True)
        if clip is not None:
            amax = amax * clip
        return (amax / self.max_level(spec)).clamp(min=SCALE_MIN)

    def valid(self, scale: torch.Tensor) -> torch.Tensor:
        """A learned (LSQ) or fixed (GPTQ) scale tensor as the grid may use it."""
        return scale.abs().clamp(min=SCALE_MIN)

    def check(self, spec: QuantSpec) -> str | None:
        """Why this format cannot take ``spec`` (one line), or None when it can."""
        return None

    @abc.abstractmethod
    def max_level(self, spec: QuantSpec) -> float:
        """The grid's largest magnitude in units of the scale: ``scale = amax / max_level``."""

    @abc.abstractmethod
    def fake_quantize(
        self, blocks: torch.Tensor, scale: torch.Tensor, spec: QuantSpec
    ) -> torch.Tensor:
        """Weights ``(rows, groups, group)`` rounded to the grid (exact forward, STE backward),
        with the scale rounded to float16 as it is stored — so the packed artifact reproduces the
        fake-quant weights bit for bit."""

    @abc.abstractmethod
    def pack(self, rows: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """The stored tensor of weight ``rows`` with float32 ``scale`` ``(rows, groups, 1)``."""

    @abc.abstractmethod
    def unpack(
        self,
        stored: torch.Tensor,
        scale: torch.Tensor,
        spec: QuantSpec,
        rows_shape: tuple[int, int],
    ) -> torch.Tensor:
        """Float32 weight rows from the stored tensor and float16 scales ``(rows, groups)``."""

    def kernel(self, layer: str, spec: QuantSpec, device_type: str) -> str:
        """The kernel that runs ``spec`` for a ``layer`` kind on ``device_type``."""
        return "dequant"

    def label(self, spec: QuantSpec) -> str:
        """The short name of a choice in a space (``w4``, ``w4g128a8``, ``fp8``)."""
        return self.name
