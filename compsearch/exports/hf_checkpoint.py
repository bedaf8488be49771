"""What every Hugging Face–style export shares: the pruned model's ``config.json``, its tensors under
the names transformers uses, the tokenizer, and publishing a folder in one step.

A pruned model keeps its architecture class; what changes are sizes. :func:`pruned_config` finds
the teacher config whose model has exactly the pruned tensors' shapes: it tries the size fields a
pruning can change (``intermediate_size``, attention and key/value heads, ...) at the values the
changed shapes imply, builds each candidate on the meta device, and keeps the one whose every
tensor shape matches. Where layers were pruned to different sizes no single config describes the
model (transformers' classes take one size per field): that export is refused with the layers
that differ, and ``compsearch.load`` — which replays the pruning on the teacher — is the loader.
Dropped blocks are refused the same way (the config has no "skip this layer").
"""

from __future__ import annotations

import copy
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compsearch._files import publish_folder, recover_folder, remove_stale_folders
from compsearch.errors import ExportError
from compsearch.kernels.formats import get_format
from compsearch.kernels.packing import PackedModel, PackedWeight

#: the config fields a structured pruning can change (one size for every layer)
SIZE_FIELDS = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "ffn_dim",
    "n_inner",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
)
MAX_CANDIDATES = 256


def require_hf_model(model: nn.Module, format: str) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ExportError(
            f"--format {format} writes a Hugging Face checkpoint, which needs a transformers "
            f"model, but this task's model is a {type(model).__name__}; export it with "
            "--format onnx instead."
        )


def integer_codes(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(codes int8 (rows, fan_in), scales float32 (rows, groups), bits)`` with weight = codes x
    scale exactly (:meth:`PackedWeight.int8_codes`); the mid-rise grid's codes ``2q + 1`` need one
    bit more than the recipe's width."""
    codes, scale = weight.int8_codes()
    wider = bool(get_format(weight.spec.w_format).grid(weight.spec)[2])
    return codes, scale, weight.spec.w_bits + wider


def pruned_shapes(packed: PackedModel) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the artifact's (pruned) model and its shape."""
    shapes = {key: tuple(value.shape) for key, value in packed.floats.items()}
    for name, weight in packed.weights.items():
        shapes[name if weight.stacked else f"{name}.weight"] = tuple(weight.shape)
    for name, owner in packed.ties.items():
        shapes[f"{name}.weight"] = shapes[f"{owner}.weight"]
    return shapes


def _meta_shapes(model_class: type, config) -> dict[str, tuple[int, ...]] | None:
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception:  # an inconsistent candidate (e.g. heads not dividing) fails to build
        return None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def pruned_config(teacher: nn.Module, shapes: dict[str, tuple[int, ...]]):
    """The teacher's config with the sizes that make its class hold exactly ``shapes``."""
    config = teacher.config
    reference = {key: tuple(value.shape) for key, value in teacher.state_dict().items()}
    missing = sorted(set(reference) - set(shapes))
    if missing:
        raise ExportError(
            f"the pruned model has no {missing[0]!r} ({len(missing)} tensors missing: dropped "
            "blocks), which a config.json cannot say; compsearch.load(<artifact>) loads it."
        )
    if all(reference[key] == shapes[key] for key in reference):
        return copy.deepcopy(config)
    pairs = {
        (old, new)
        for key in reference
        for old, new in zip(reference[key], shapes[key], strict=False)
        if old != new
    }
    options = []
    for name in SIZE_FIELDS:
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            continue
        found = {value} | {
            value * new // old for old, new in pairs if old % value == 0 and value * new % old == 0
        }
        options.append([(name, size) for size in sorted(found, reverse=True)])
    for combo in itertools.islice(itertools.product(*options), MAX_CANDIDATES):
        candidate = copy.deepcopy(config)
        for name, size in combo:
            setattr(candidate, name, size)
        built = _meta_shapes(type(teacher), candidate)
        if built is not None and all(built.get(key) == shapes[key] for key in reference):
            return candidate
    differing = sorted(key for key in reference if reference[key] != shapes[key])
    sizes = sorted({shapes[key] for key in differing})
    raise ExportError(
        f"no single {type(config).__name__} holds the pruned sizes ({len(differing)} tensors "
        f"pruned to {len(sizes)} different shapes, e.g. {differing[0]} {shapes[differing[0]]}): "
        "transformers' classes take one size per layer field. Prune every layer to the same "
        "size for a config.json export; compsearch.load(<artifact>) loads this one."
    )


def save_tokenizer(task: object, folder: Path) -> bool:
    """The task's tokenizer beside the weights, where the task has one."""
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return False
    tokenizer.save_pretrained(folder)
    return True


@contextmanager
def folder_written_atomically(target: Path) -> Iterator[Path]:
    """A scratch folder beside ``target``; when the block succeeds it becomes ``target`` (an
    earlier export there is replaced), and when it fails nothing at ``target`` changes. What a
    killed export left — a replacement half done, scratch folders — is finished or removed first."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"out: expected a folder, but {str(target)!r} is a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target, keep=())
    remove_stale_folders(target.parent, f".{target.name}.scratch-")
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.scratch-"))
    try:
        yield scratch
        publish_folder(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
