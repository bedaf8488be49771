"""GGUF files (llama.cpp) for causal LMs loaded from a GGUF teacher.

The file keeps the teacher GGUF's metadata (architecture, hyperparameters, tokenizer, chat
template), with the sizes a uniform pruning changed, and writes every tensor anew from the
artifact — compsearch's own codes and float16 scales, nothing quantized again:

=====================================================  ====================================
recipe layer (codes ``c`` with weight ``c x d``)       GGUF type (32-weight blocks, fp16 d)
=====================================================  ====================================
``intz`` 2–4 bits; ``int`` 2–3 bits (``2q + 1``, s/2)  Q4_0  (c in [-8, 7])
``intz`` 5 bits; ``int`` 4 bits (``2q + 1``, s/2)      Q5_0  (c in [-16, 15])
``intz``/``int`` 5–8 bits                              Q8_0  (c in [-128, 127])
``affine`` 2–4 bits (``s q + m``, fp16 m)              Q4_1  (q in [0, 15])
``affine`` 5 bits                                      Q5_1  (q in [0, 31])
float (not quantized)                                  F32
=====================================================  ====================================

Per channel, or per group of a multiple of 32 weights: the group's scale is repeated for each of
its 32-weight blocks (exact). Refused, with the reason: groups that are not a multiple of 32
(Q4_0/Q8_0 blocks are 32 weights), int8 inputs (GGUF holds weights; llama.cpp quantizes inputs
its own way), ``affine`` above 5 bits (GGUF has no 8-bit type with a minimum), fp8 and plug-in
formats, and a teacher not loaded from a GGUF file (its tokenizer and metadata come from there).
The mid-rise ``int`` grid does not go to Q4_1: its fp16 minimum cannot hold ``-7.5 s`` exactly.

Llama-family q/k rows are stored in llama.cpp's rotary order (the permutation its converter
applies), scales permuted with their rows. Before the file is published it is read back with
``gguf`` (every tensor dequantized and compared with compsearch's, exactly) and loaded with
transformers' GGUF loader (every weight of the model compared, exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.errors import ExportError
from compsearch.exports.hf_checkpoint import (
    integer_codes,
    pruned_config,
    pruned_shapes,
    require_hf_model,
)
from compsearch.kernels._bits import unpack_codes
from compsearch.kernels.formats import get_format
from compsearch.kernels.formats.affine import AffineFormat
from compsearch.kernels.formats.int_grid import IntFormat
from compsearch.kernels.packing import PackedModel, PackedWeight

BLOCK = 32
#: config field -> GGUF key (after ``<arch>.``) that a uniform pruning changes
SIZE_KEYS = {
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
}
PERMUTED = ("llama", "mistral")  # llama.cpp stores their q/k rows in rotary order
SKIPPED_KEYS = ("GGUF.", "general.file_type")


@dataclass(frozen=True)
class GgufExport:
    path: Path
    size_bytes: int
    types: dict[str, str]  # tensor -> GGUF type


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(
            "--format gguf writes and reads back with the gguf package: "
            "pip install 'compsearch[llm]'"
        ) from None
    return gguf


def _qtype(name: str, weight: PackedWeight) -> str:
    spec = weight.spec
    fmt = get_format(spec.w_format)
    if isinstance(fmt, AffineFormat) and spec.w_bits > 5:
        raise ExportError(f"layer {name!r}: GGUF has no {spec.w_bits}-bit type with a minimum "
                          "(affine); use 2-5 bits or intz. Nothing was written.")  # fmt: skip
    if not isinstance(fmt, (IntFormat, AffineFormat)):
        raise ExportError(f"layer {name!r}: GGUF has no type for {spec.w_format} weights; "
                          "nothing was written.")  # fmt: skip
    if spec.quantizes_input:
        raise ExportError(
            f"layer {name!r} quantizes its inputs to int8, which a GGUF file cannot hold (it "
            "stores weights; llama.cpp quantizes inputs its own way); export a weight-only "
            "recipe. Nothing was written."
        )
    group = spec.group_size if spec.granularity == "per_group" else None
    fan_in = weight.rows_shape[1]
    if fan_in % BLOCK or (group is not None and group % BLOCK):
        raise ExportError(
            f"layer {name!r}: GGUF blocks are 32 weights, but its scales cover groups of "
            f"{group or fan_in}; use a group size that is a multiple of 32. Nothing was written."
        )
    if isinstance(fmt, AffineFormat):
        return "Q4_1" if spec.w_bits <= 4 else "Q5_1"
    bits = spec.w_bits + bool(fmt.grid(spec)[2])  # mid-rise codes 2q + 1 take one bit more
    return "Q4_0" if bits <= 4 else "Q5_0" if bits == 5 else "Q8_0"


def _codes_and_scales(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(rows, fan_in)`` and float32 per-group parameters ``(rows, groups, width)``:
    signed codes and ``[d]`` for integer grids, unsigned codes and ``[d, m]`` for affine."""
    if isinstance(get_format(weight.spec.w_format), AffineFormat):
        rows, fan_in = weight.rows_shape
        codes = unpack_codes(weight.data, weight.spec.w_bits, rows * fan_in).reshape(rows, fan_in)
        return codes.to(torch.int32), weight.scale.to(torch.float32).reshape(rows, -1, 2)
    codes, scale, _ = integer_codes(weight)
    return codes, scale.unsqueeze(-1)


def _rotary_order(rows: int, heads: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to q/k (``permute`` in its script)."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(rows)


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, qtype: str) -> np.ndarray:
    """``codes`` ``(rows, fan_in)`` and per-block parameters ``(rows, fan_in / 32, width)``
    (float32, float16-exact: ``[d]``, or ``[d, m]`` for Q4_1/Q5_1) as GGUF ``qtype`` blocks,
    ``(rows, bytes)`` uint8."""
    rows, fan_in = codes.shape
    blocks = codes.reshape(rows, fan_in // BLOCK, BLOCK).to(torch.int32)
    d = scale.to(torch.float16).contiguous().view(torch.uint8)  # 2 bytes per number per block
    if qtype == "Q8_0":
        body = blocks.to(torch.int8).view(torch.uint8)
    else:
        offset = {"Q4_0": 8, "Q5_0": 16}.get(qtype, 0)  # Q4_1/Q5_1 codes are unsigned already
        unsigned = blocks + offset
        low = unsigned & 0xF
        body = (low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8)
        if qtype in ("Q5_0", "Q5_1"):
            high = ((unsigned >> 4) & 1).to(torch.int64)
            word = (high << torch.arange(BLOCK, dtype=torch.int64)).sum(-1, keepdim=True)
            qh = word.view(torch.uint8)[..., :4]  # the low 4 bytes: a little-endian uint32
            body = torch.cat([qh, body], -1)
    return torch.cat([d, body], -1).reshape(rows, -1).numpy()


def _block_scales(weight: PackedWeight, scale: torch.Tensor) -> torch.Tensor:
    """Per-group parameters repeated for each 32-weight block of the group."""
    rows, fan_in = weight.rows_shape
    return scale.repeat_interleave(fan_in // BLOCK // scale.shape[1], dim=1)


def export_gguf(task, teacher: nn.Module, packed: PackedModel, target: Path) -> GgufExport:
    gguf = _gguf()
    source = getattr(task, "gguf_file", None)
    if source is None:
        raise ExportError(
            "--format gguf takes its tokenizer and metadata from the teacher's GGUF file, but "
            f"task {getattr(task, 'name', '?')!r} was not loaded from one; use --format "
            "compressed-tensors or onnx."
        )
    require_hf_model(teacher, "gguf")
    config = pruned_config(teacher, pruned_shapes(packed))
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     blocks)  # fmt: skip
    expected: dict[str, np.ndarray] = {}  # GGUF name -> float32 values as the file must give
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    weights = {(n if w.stacked else f"{n}.weight"): (n, w) for n, w in packed.weights.items()}
    keys = list(packed.floats) + list(weights)
    teacher_names = {t.name for t in reader.tensors}
    for key in keys:
        base, _, suffix = key.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise ExportError(f"tensor {key!r} has no GGUF name for architecture {arch!r}; "
                              "nothing was written.")  # fmt: skip
        gname = f"{mapped}.{suffix}"
        if gname not in teacher_names:
            continue  # e.g. lm_head tied to token_embd: the file has no output.weight
        heads = None
        if arch in PERMUTED and mapped.endswith(("attn_q", "attn_k")) and suffix == "weight":
            heads = config.num_attention_heads
            if mapped.endswith("attn_k"):
                heads = getattr(config, "num_key_value_heads", None) or heads
        if key in weights:
            name, weight = weights[key]
            qtype = _qtype(name, weight)
            codes, scale = _codes_and_scales(weight)
            scale = _block_scales(weight, scale)
            if not torch.equal(scale.to(torch.float16).to(torch.float32), scale):
                raise ExportError(f"layer {name!r}: a scale is not a float16 value (GGUF stores "
                                  "block scales as float16); nothing was written.")  # fmt: skip
            values = weight.dequantize()
            if heads is not None:
                order = _rotary_order(codes.shape[0], heads)
                codes, scale, values = codes[order], scale[order], values[order]
            data = encode_blocks(codes, scale, qtype)
            tensors[gname] = (data, getattr(gguf.GGMLQuantizationType, qtype))
            expected[gname] = values.numpy()
        else:
            value = packed.floats[key].detach().to(torch.float32)
            if heads is not None:
                value = value[_rotary_order(value.shape[0], heads)]
            tensors[gname] = (value.contiguous().numpy(), None)
            expected[gname] = tensors[gname][0]
    absent = sorted(teacher_names - set(tensors))
    if absent:
        raise ExportError(f"the teacher's GGUF has {absent[0]!r}, which the artifact does not "
                          "give; nothing was written.")  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.tmp")
    try:
        writer = gguf.GGUFWriter(scratch, arch)
        _copy_metadata(gguf, reader, writer, arch, config)
        order = {t.name: index for index, t in enumerate(reader.tensors)}  # the teacher's order
        for gname in sorted(tensors, key=order.__getitem__):
            data, raw = tensors[gname]
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_read_back(gguf, scratch, expected)
        _check_transformers(type(teacher), scratch, packed)
        scratch.replace(target)
    finally:
        scratch.unlink(missing_ok=True)
    types = {gname: (raw.name if raw is not None else "F32") for gname, (_, raw) in tensors.items()}
    return GgufExport(target, target.stat().st_size, types)


def _copy_metadata(gguf, reader, writer, arch: str, config) -> None:
    sizes = {f"{arch}.{key}": getattr(config, name) for name, key in SIZE_KEYS.items()
             if getattr(config, name, None) is not None}  # fmt: skip
    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_KEYS) or key == "general.architecture":
            continue
        value = sizes.get(key, field.contents())
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)


def _check_read_back(gguf, path: Path, expected: dict[str, np.ndarray]) -> None:
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            expected[tensor.name].shape
        )
        if not np.array_equal(values.astype(np.float32), expected[tensor.name]):
            raise ExportError(
                f"expected the GGUF tensor {tensor.name!r} to read back exactly as compsearch "
                "stores it, but it differs; nothing was written. Please report it."
            )


def _check_transformers(model_class: type, path: Path, packed: PackedModel) -> None:
    loaded = model_class.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = loaded.state_dict()
    for key, value in packed.floats.items():
        if not torch.equal(state[key], value.float()):
            raise ExportError(f"transformers loads {key!r} from the GGUF file differently from "
                              "compsearch's; nothing was written.")  # fmt: skip
    for name, weight in packed.weights.items():
        key = name if weight.stacked else f"{name}.weight"
        if not torch.equal(state[key], weight.dequantize()):
            raise ExportError(f"transformers loads {key!r} from the GGUF file differently from "
                              "compsearch's; nothing was written.")  # fmt: skip
