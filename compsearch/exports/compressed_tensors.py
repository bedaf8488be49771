"""compressed-tensors checkpoints (the layout vLLM and transformers load): a folder with
``config.json`` (the pruned config plus ``quantization_config``), ``model.safetensors`` and the
tokenizer.

Each quantized Linear is written from compsearch's own codes and float16 scales — nothing is
quantized again:

* weights: ``int`` symmetric, ``strategy`` ``channel`` or ``group`` (``group_size``); the codes
  ``q`` of ``intz`` and 8-bit grids as ``num_bits`` = the width; the mid-rise grid below 8 bits
  (``s (q + 1/2)``, no zero level) as its integer form ``2q + 1`` at ``s/2``, one bit wider
  (a 3-bit recipe is an int4 checkpoint, a 4-bit one int5 — use ``w_format: intz`` for int4);
* format ``pack-quantized`` (codes packed densely into int32, ``weight_shape`` beside), or
  ``int-quantized`` (int8 codes) where the layer also quantizes its inputs (W8A8);
* inputs: static int8 as ``strategy: tensor`` with ``input_scale``; per-token dynamic as
  ``strategy: token, dynamic: true``. (compsearch clamps inputs to ±127, compressed-tensors to
  [-128, 127]: one level apart at the negative end, noted in the report.)

Scales are stored as float32 (their float16 values), so ``q * scale`` decompresses to compsearch's
weights exactly. Embeddings (a tied LM head with them) are stored dense at their quantized values:
the schemes written here target Linear layers, the layers vLLM's compressed-tensors kernels run.
Convolutions, transposed (Conv1D) and stacked expert weights, ``affine`` (a float16 minimum, where compressed-tensors stores an integer zero point), and
plug-in formats are refused with the reason. ``fp8`` weights go as ``float-quantized`` (float8
e4m3 values, per-channel scales), with per-token dynamic fp8 inputs where the recipe quantizes
inputs — what compsearch's fp8 kernel computes.

Before the folder is published, transformers loads it (each layer compressed as its config group
says), compressed-tensors decompresses it, and every tensor is compared with compsearch's, exactly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compsearch.errors import ExportError
from compsearch.exports.hf_checkpoint import (
    folder_bytes,
    folder_written_atomically,
    integer_codes,
    pruned_config,
    pruned_shapes,
    require_hf_model,
    save_tokenizer,
)
from compsearch.kernels._bits import pack_codes
from compsearch.kernels.formats import get_format
from compsearch.kernels.formats.affine import AffineFormat
from compsearch.kernels.formats.fp8 import Fp8Format
from compsearch.kernels.formats.int_grid import IntFormat
from compsearch.kernels.packing import PackedModel, PackedWeight

EXTRA = "pip install 'compsearch[compressed-tensors]'"
WORD_BITS = 32


def require_compressed_tensors():
    try:
        import compressed_tensors
    except ImportError:
        raise ExportError(
            "--format compressed-tensors builds its quantization_config with, and checks the "
            f"folder by loading it through, the compressed-tensors library: {EXTRA}"
        ) from None
    return compressed_tensors


@dataclass
class CompressedTensorsExport:
    folder: Path
    size_bytes: int
    schemes: dict[str, str]  # layer -> short description of how it is stored
    notes: list[str] = field(default_factory=list)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` layout: each row's codes, offset by ``2**(bits-1)``,
    as one little-endian bit stream (LSB first) in int32 words — compsearch's own dense packing,
    padded so that every row starts a word."""
    rows, cols = codes.shape
    padded = -(-cols // WORD_BITS) * WORD_BITS
    unsigned = torch.zeros(rows, padded, dtype=torch.int32)
    unsigned[:, :cols] = codes.to(torch.int32) + (1 << (bits - 1))
    stream = pack_codes(unsigned, bits).reshape(rows, -1)  # padded*bits/8 bytes per row
    words = stream.view(torch.int32)
    return words[:, : -(-cols * bits // WORD_BITS)].contiguous()


def _refusal(name: str, weight: PackedWeight, module: nn.Module) -> str | None:
    if isinstance(get_format(weight.spec.w_format), AffineFormat):
        return (f"layer {name!r}: affine weights keep a float16 minimum per group, and "
                "compressed-tensors' asymmetric int an integer zero point; use int or intz")  # fmt: skip
    if not isinstance(get_format(weight.spec.w_format), (IntFormat, Fp8Format)):
        return f"layer {name!r}: {weight.spec.w_format} weights have no compressed-tensors form"
    if weight.stacked or weight.transposed or not isinstance(module, (nn.Linear, nn.Embedding)):
        return (f"layer {name!r} is a {type(module).__name__}: compressed-tensors quantizes "
                "Linear layers")  # fmt: skip
    return None


def _fp8_layer(name: str, weight: PackedWeight):
    """An fp8 Linear: its float8 values and per-channel scales (``float-quantized``); fp8 inputs
    as the deploy kernel computes them, per token at run time."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    inputs = None
    if weight.spec.quantizes_input:
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                  "strategy": "token"}  # fmt: skip
    tensors = {f"{name}.weight": weight.data.contiguous(),
               f"{name}.weight_scale": weight.scale.to(torch.float32).contiguous()}  # fmt: skip
    scheme = {"weights": weights, "input_activations": inputs, "format": "float-quantized"}
    a8 = ", fp8 inputs (per token)" if inputs else ""
    return scheme, tensors, f"fp8 e4m3 per channel{a8}, float-quantized"


def _layer(name: str, weight: PackedWeight, packed: PackedModel):
    """``(scheme, tensors, description)`` of one quantized Linear."""
    spec = weight.spec
    if isinstance(get_format(spec.w_format), Fp8Format):
        return _fp8_layer(name, weight)
    codes, scale, bits = integer_codes(weight)
    grouped = spec.granularity == "per_group"
    weights = {"num_bits": bits, "type": "int", "symmetric": True,
               "strategy": "group" if grouped else "channel",
               "group_size": spec.group_size if grouped else None}  # fmt: skip
    inputs = None
    tensors = {f"{name}.weight_scale": scale.contiguous()}
    mode = packed.activation_modes.get(name)
    if spec.quantizes_input:
        dynamic = mode == "dynamic"
        inputs = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": dynamic,
                  "strategy": "token" if dynamic else "tensor"}  # fmt: skip
        if not dynamic:
            tensors[f"{name}.input_scale"] = torch.tensor([packed.input_scales[name]])
    if inputs is not None:
        form = "int-quantized"
        tensors[f"{name}.weight"] = codes.contiguous()
    else:
        form = "pack-quantized"
        tensors[f"{name}.weight_packed"] = pack_int32(codes, bits)
        tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    scheme = {"weights": weights, "input_activations": inputs, "format": form}
    where = f"g{spec.group_size}" if grouped else "per channel"
    a8 = f", int8 inputs ({mode})" if inputs else ""
    return scheme, tensors, f"int{bits} {where}{a8}, {form}"


def export_compressed_tensors(task, teacher: nn.Module, packed: PackedModel,
                              target: Path) -> CompressedTensorsExport:  # fmt: skip
    ct = require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    require_hf_model(teacher, "compressed-tensors")
    config = pruned_config(teacher, pruned_shapes(packed))
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, str] = {}
    notes: list[str] = []
    dense = {}
    for name, weight in packed.weights.items():
        module = teacher.get_submodule(name)
        reason = _refusal(name, weight, module)
        if reason is not None:
            raise ExportError(f"{reason}; nothing was written.")
        if isinstance(module, nn.Embedding):
            dense[f"{name}.weight"] = weight.dequantize()
            schemes[name] = "dense: its quantized values (schemes are written for Linear layers)"
            continue
        scheme, layer_tensors, schemes[name] = _layer(name, weight, packed)
        groups[json.dumps(scheme, sort_keys=True)].append(name)
        tensors.update(layer_tensors)
    for name, owner in packed.ties.items():
        schemes[name] = f"tied to {owner}"
    notes.extend(_unfusable(groups))
    if any(weight.spec.quantizes_input for weight in packed.weights.values()):
        notes.append("int8 inputs: compsearch clamps to [-127, 127], compressed-tensors' int8 "
                     "range is [-128, 127]")  # fmt: skip
    for key, value in packed.floats.items():
        tensors[key] = value.contiguous()
    tensors.update(dense)
    for name in packed.ties:
        tensors.pop(f"{name}.weight", None)  # tied: transformers restores it from its owner
    config_groups = {}
    formats = set()
    for index, (key, names) in enumerate(sorted(groups.items())):
        scheme = json.loads(key)
        formats.add(scheme["format"])
        config_groups[f"group_{index}"] = QuantizationScheme(targets=sorted(names), **scheme)
    with folder_written_atomically(target) as scratch:
        config.dtype = torch.float32
        if config_groups:
            quant = QuantizationConfig(
                config_groups=config_groups,
                format=formats.pop() if len(formats) == 1 else "mixed-precision",
                quantization_status="compressed",
            )
            config.quantization_config = {"quant_method": "compressed-tensors",
                                          "version": ct.__version__,
                                          **quant.model_dump(exclude={"quant_method"})}  # fmt: skip
        elif hasattr(config, "quantization_config"):  # the teacher's own (e.g. its GGUF loading)
            del config.quantization_config
        config.save_pretrained(scratch)
        save_file({k: v.detach().cpu() for k, v in tensors.items()},
                  scratch / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
        save_tokenizer(task, scratch)
        check_loaded(type(teacher), scratch, packed)
        size = folder_bytes(scratch)
    return CompressedTensorsExport(target, size, schemes, notes)


#: projections vLLM runs as one fused layer, which must share one scheme
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _unfusable(groups: dict[str, list[str]]) -> list[str]:
    """A note for each set of projections vLLM fuses that carries more than one scheme."""
    scheme_of = {name: key for key, names in groups.items() for name in names}
    notes = []
    for parts in FUSED:
        prefixes = {n.rsplit(".", 1)[0] for n in scheme_of if n.endswith("." + parts[0])}
        for prefix in sorted(prefixes):
            found = {scheme_of.get(f"{prefix}.{part}") for part in parts}
            if len(found) > 1:
                notes.append(f"{prefix}: {'/'.join(parts)} carry different schemes; vLLM fuses "
                             "them into one layer and needs one scheme")  # fmt: skip
    return notes


def check_loaded(model_class: type, folder: Path, packed: PackedModel) -> None:
    """Load ``folder`` with transformers (each layer compressed as its config group says), let
    compressed-tensors decompress it, and compare every tensor with compsearch's; any difference
    refuses the export. (transformers' own ``dequantize=True`` shortcut applies one scheme to
    every dense layer, so a mixed-precision checkpoint is decompressed by the library here.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = model_class.from_pretrained(folder, dtype=torch.float32)
        quantizer = getattr(loaded, "hf_quantizer", None)  # None: nothing quantized (pruned only)
        if quantizer is not None:
            quantizer.compressor.decompress_model(loaded)
    state = loaded.state_dict()
    expected = dict(packed.floats)
    for name, weight in packed.weights.items():
        expected[name if weight.stacked else f"{name}.weight"] = weight.dequantize()
    for key, value in expected.items():
        got = state.get(key)
        if got is None or got.shape != value.shape or not torch.equal(got.float(), value.float()):
            raise ExportError(
                f"expected the compressed-tensors checkpoint to load {key!r} exactly as "
                "compsearch stores it, but it differs; nothing was written. Please report it "
                "with the artifact."
            )
