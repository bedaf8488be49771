"""Exact packing: n-bit weight codes packed densely into bytes, saved as safetensors.

Codes are stored unsigned (``q - qmin``), LSB first, eight codes per ``n`` bytes, for every ``n`` in
2..8; scales as float16 ``(rows, groups)``; fp8 weights as float8 e4m3 bytes. Everything that is not
a quantized weight (biases, norms, float layers) is stored as it is. The artifact's size is the file's
size: no padding beyond the last partial byte of each packed tensor.

File layout (``model.safetensors``)::

    <layer>.weight.<suffix>  the format's stored tensor (see compsearch.kernels.formats):
                             ``codes`` uint8 packed codes (int), ``fp8`` float8_e4m3fn (fp8)
    <layer>.weight.scale   float16 (rows, groups x the format's scale_width)
    <layer>.input_scale    float32 ()      static activation scale, when a_bits == 8
    <anything else>        the float tensors of the model's state dict
    metadata: one entry, ``compsearch``: zlib-compressed, base85-encoded JSON of
    ``{"compsearch.format", "compsearch.layers" (spec, shape), "compsearch.ties",
    "compsearch.activation_modes"}`` and the entries the caller adds (``compsearch.recipe``,
    ``compsearch.prune_record``). Compressed because the header counts in the file's size: on a
    small model, plain-text metadata was a quarter of the file. :func:`read_packed` returns the
    decoded entries as a flat dict; artifacts of format ``compsearch-packed/1`` (plain entries)
    are still read.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn

from compsearch._files import write_atomic
from compsearch.errors import KernelError
from compsearch.kernels._bits import pack_codes, packed_nbytes, unpack_codes  # noqa: F401
from compsearch.kernels.formats import get_format
from compsearch.kernels.quant import (
    QuantSpec,
    quant_modules,
    rows_view,
    stacked_modules,
)

FORMAT = "compsearch-packed/2"
FORMATS_READ = ("compsearch-packed/1", FORMAT)
METADATA_KEY = "compsearch"


# -- bit packing -----------------------------------------------------------------------------------


# -- a quantized layer's stored form ---------------------------------------------------------------


@dataclass
class PackedWeight:
    """One quantized weight as stored: its format's tensor, float16 scales and how to read them."""

    spec: QuantSpec
    shape: tuple[int, ...]  # the module's weight shape
    transposed: bool  # Conv1D keeps its weight as (in, out)
    scale: torch.Tensor  # float16 (rows, groups)
    data: torch.Tensor  # what the format stores (int: packed unsigned codes; fp8: float8 values)
    stacked: bool = False  # a module's own (experts, out, in) parameter: rows are (expert, out)

    @property
    def rows_shape(self) -> tuple[int, int]:
        if self.stacked:
            return (self.data_rows(), self.shape[-1])
        if self.transposed:
            return (self.shape[1], self.shape[0])
        fan_in = 1
        for size in self.shape[1:]:
            fan_in *= size
        return (self.shape[0], fan_in)

    def data_rows(self) -> int:
        rows = 1
        for size in self.shape[:-1]:
            rows *= size
        return rows

    def signed_codes(self) -> torch.Tensor:
        """Codes ``q`` as int32, shape ``rows_shape`` (int formats)."""
        return get_format(self.spec.w_format).signed_codes(self.data, self.spec, self.rows_shape)

    def int8_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, sigma)``: int8 codes (rows, fan_in) and float32 scales (rows, groups) with
        ``weight = sigma * c`` (see compsearch.kernels.quant)."""
        q = self.signed_codes()
        scale = self.scale.to(torch.float32)
        if get_format(self.spec.w_format).grid(self.spec)[2]:  # mid-rise: s (q + 1/2)
            return (2 * q + 1).to(torch.int8), scale / 2
        return q.to(torch.int8), scale

    def dequantize(self) -> torch.Tensor:
        """The float weight, in the module's own layout, bit-equal to the fake-quant weight."""
        rows = get_format(self.spec.w_format).unpack(self.data, self.scale, self.spec,
                                                     self.rows_shape)  # fmt: skip
        return rows.t().contiguous() if self.transposed else rows.reshape(self.shape)


@torch.no_grad()
def pack_weight(module: nn.Module) -> PackedWeight:
    """The stored form of a Quant module's weight, from the same codes its forward uses."""
    quantizer = module.weight_quant
    spec = quantizer.spec
    rows = rows_view(module.weight.detach(), quantizer.transposed).float()
    scale = quantizer.current_scale(module.weight.detach()).detach().float()
    scale16 = scale.to(torch.float16)
    return PackedWeight(
        spec=spec,
        shape=tuple(module.weight.shape),
        transposed=quantizer.transposed,
        scale=scale16.reshape(scale16.shape[0], -1).contiguous(),
        data=get_format(spec.w_format).pack(rows, scale, spec),
    )


@torch.no_grad()
def pack_stacked(module: nn.Module, name: str) -> PackedWeight:
    """The stored form of one stacked parameter of a StackedQuant module."""
    quantizer = module.stack_quant[name]
    param = module._parameters[name].detach()
    rows = param.reshape(-1, param.shape[-1]).float()
    scale = quantizer.current_scale(rows).detach().float()
    return PackedWeight(
        spec=quantizer.spec,
        shape=tuple(param.shape),
        transposed=False,
        scale=scale.to(torch.float16).reshape(scale.shape[0], -1).contiguous(),
        data=get_format(quantizer.spec.w_format).pack(rows, scale, quantizer.spec),
        stacked=True,
    )


# -- artifact --------------------------------------------------------------------------------------


@dataclass
class PackedModel:
    """Everything an artifact holds: packed weights, input scales, float tensors, ties."""

    weights: dict[str, PackedWeight]
    input_scales: dict[str, float]
    activation_modes: dict[str, str]
    floats: dict[str, torch.Tensor]
    ties: dict[str, str]  # layer -> layer whose packed weight it shares


@torch.no_grad()
def export_packed(model: nn.Module) -> PackedModel:
    """Pack every Quant module of ``model``; keep every other tensor of its state dict as is."""
    layers = quant_modules(model)
    weights: dict[str, PackedWeight] = {}
    ties: dict[str, str] = {}
    by_weight: dict[int, str] = {}
    input_scales: dict[str, float] = {}
    activation_modes: dict[str, str] = {}
    for name, module in layers.items():
        if module.input_quant is not None:
            activation_modes[name] = module.input_quant.mode
            if module.input_quant.mode == "static":
                input_scales[name] = float(module.input_quant.current_scale())
        if not module.spec.quantizes_weight:
            continue
        owner = by_weight.get(id(module.weight))
        if owner is not None:
            ties[name] = owner
            continue
        by_weight[id(module.weight)] = name
        weights[name] = pack_weight(module)
    skip = set()
    for name, module in stacked_modules(model).items():  # keyed by the parameter's own name
        for param in module.stacked:
            weights[f"{name}.{param}"] = pack_stacked(module, param)
            skip.add(f"{name}.{param}")
        skip.update(
            f"{name}.{key}" for key in module.state_dict() if key.startswith("stack_quant.")
        )
    for name, module in layers.items():
        prefix = f"{name}." if name else ""
        skip.update(
            prefix + key
            for key, _ in module.named_parameters(recurse=True)
            if key.startswith(("weight_quant.", "input_quant."))
        )
        skip.update(
            prefix + key
            for key, _ in module.named_buffers(recurse=True)
            if key.startswith(("weight_quant.", "input_quant."))
        )
        if module.spec.quantizes_weight:
            skip.add(prefix + "weight")
    state = model.state_dict()
    floats = {key: value.detach() for key, value in state.items() if key not in skip}
    return PackedModel(weights, input_scales, activation_modes, floats, ties)


def packed_to_bytes(packed: PackedModel, metadata: dict[str, str] | None = None) -> bytes:
    tensors, header = _stored(packed, metadata)
    return save_bytes(tensors, metadata=header)


def _stored(
    packed: PackedModel, metadata: dict[str, str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata an artifact file holds."""
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    for name, weight in packed.weights.items():
        suffix = get_format(weight.spec.w_format).stored_suffix
        stem = stored_stem(name, weight.stacked)
        tensors[f"{stem}.{suffix}"] = weight.data.contiguous().cpu()
        tensors[f"{stem}.scale"] = weight.scale.contiguous().cpu()
        layers_meta[name] = {
            "spec": weight.spec.to_dict(),
            "shape": list(weight.shape),
            "transposed": weight.transposed,
        }
        if weight.stacked:
            layers_meta[name]["stacked"] = True
    for name, scale in packed.input_scales.items():
        tensors[f"{name}.input_scale"] = torch.tensor(scale, dtype=torch.float32)
    for key, value in packed.floats.items():
        if key in tensors:
            raise KernelError(f"export: the state dict key {key!r} collides with a packed tensor.")
        tensors[key] = value.contiguous().cpu()
    meta = {
        "compsearch.format": FORMAT,
        "compsearch.layers": json.dumps(layers_meta, sort_keys=True),
        "compsearch.ties": json.dumps(packed.ties, sort_keys=True),
        "compsearch.activation_modes": json.dumps(packed.activation_modes, sort_keys=True),
    }
    meta.update(metadata or {})
    return _dedupe_shared(tensors), {METADATA_KEY: encode_metadata(meta)}


def stored_stem(name: str, stacked: bool) -> str:
    """``<layer>.weight`` for a layer's weight; a stacked parameter is stored under its own name."""
    return name if stacked else f"{name}.weight"


def encode_metadata(entries: dict[str, str]) -> str:
    """``entries`` as one header string: JSON, zlib level 9, base85 (no quote or backslash, so
    JSON stores it unescaped)."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return base64.b85encode(zlib.compress(text, 9)).decode("ascii")


def decode_metadata(header: dict[str, str]) -> dict[str, str]:
    """The flat entries of an artifact's ``__metadata__`` (compressed or, format 1, plain)."""
    if METADATA_KEY not in header:
        return dict(header)
    return json.loads(zlib.decompress(base64.b85decode(header[METADATA_KEY])))


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; stored copies are independent anyway."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.clone() if pointer in seen and pointer != -1 else value
        seen.setdefault(pointer, key)
    return out


def save_packed(
    packed: PackedModel, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write the artifact (exactly :func:`packed_to_bytes`' bytes) atomically, streamed to the
    file rather than built in memory first: a 7B model's artifact is gigabytes."""
    tensors, header = _stored(packed, metadata)
    return write_atomic(path, lambda temp: save_file(tensors, temp, metadata=header))


def read_packed(path: str | Path) -> tuple[PackedModel, dict[str, str]]:
    """Read an artifact written by :func:`save_packed`; a damaged file is a KernelError."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load_bytes(data)
        metadata = _metadata(data)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, zlib.error) as error:
        raise KernelError(
            f"expected a compsearch safetensors artifact at {str(path)!r}, but it cannot be read "
            f"({error}). The file is missing or damaged; train or export it again."
        ) from None
    if metadata.get("compsearch.format") not in FORMATS_READ:
        raise KernelError(
            f"expected an artifact in format {FORMAT!r} at {str(path)!r}, but its format is "
            f"{metadata.get('compsearch.format')!r}."
        )
    return packed_from_tensors(tensors, metadata), metadata


def _metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return decode_metadata(header.get("__metadata__", {}))


def packed_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> PackedModel:
    layers_meta = json.loads(metadata["compsearch.layers"])
    weights = {}
    used = set()
    for name, meta in layers_meta.items():
        spec = QuantSpec(**meta["spec"])
        stacked = bool(meta.get("stacked", False))
        stem = stored_stem(name, stacked)
        stored = f"{stem}.{get_format(spec.w_format).stored_suffix}"
        weights[name] = PackedWeight(
            spec=spec,
            shape=tuple(meta["shape"]),
            transposed=meta["transposed"],
            scale=tensors[f"{stem}.scale"],
            data=tensors[stored],
            stacked=stacked,
        )
        used.update({stored, f"{stem}.scale"})
    input_scales = {
        key[: -len(".input_scale")]: float(value)
        for key, value in tensors.items()
        if key.endswith(".input_scale") and key[: -len(".input_scale")] in _quant_names(metadata)
    }
    used.update(f"{name}.input_scale" for name in input_scales)
    floats = {key: value for key, value in tensors.items() if key not in used}
    return PackedModel(
        weights,
        input_scales,
        json.loads(metadata.get("compsearch.activation_modes", "{}")),
        floats,
        json.loads(metadata.get("compsearch.ties", "{}")),
    )


def _quant_names(metadata: dict[str, str]) -> set[str]:
    return set(json.loads(metadata.get("compsearch.activation_modes", "{}")))
