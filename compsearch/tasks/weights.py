"""A model's weights read one tensor at a time from its file, for calibration that holds one block in
float at a time (``compsearch.sequential``).

:func:`empty_model` builds the architecture with every parameter on PyTorch's ``meta`` device (no
memory; buffers such as rotary tables are computed as usual); a :class:`WeightFile` then gives the
float tensors a block needs, under the model's own state-dict names, when they are asked for:

* :class:`GGUFWeights` — a GGUF file (memory-mapped, so the file stays in its storage format and
  only the asked tensors are dequantized), names and row orders mapped by transformers' own GGUF
  tables, so a tensor equals what ``from_pretrained(gguf_file=...)`` loads for it;
* :class:`SafetensorsWeights` — a folder of ``*.safetensors`` files (a Hugging Face checkpoint),
  read lazily by key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from compsearch.errors import TaskError


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the ``meta`` device as it is registered."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(model_class, config) -> nn.Module:
    """``model_class`` built from ``config`` with its parameters on ``meta`` (its buffers real)."""
    with _parameters_on_meta():
        model = model_class.from_config(config, dtype=torch.float32)
    return model.eval()


def meta_tensors(module: nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


class WeightFile:
    """The float tensors of one model, by state-dict name, read when asked for."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_into(self, model: nn.Module, wanted: Callable[[str], bool]) -> None:
        """Give every ``meta`` parameter of ``model`` whose name ``wanted`` accepts its value from the
        file; a tied parameter is given once and stays tied. Raises TaskError naming what the
        file lacks, before anything is changed."""
        todo = {n: p for n, p in model.named_parameters() if p.is_meta and wanted(n)}
        missing = sorted(set(todo) - self.names())
        if missing:
            raise TaskError(
                f"{self}: expected the tensors {missing[:3]} (of {len(missing)} missing) for "
                "the model built from its config, but the file has none by those names."
            )
        values = self.read(todo)
        for name, old in todo.items():
            if tuple(values[name].shape) != tuple(old.shape):
                raise TaskError(f"{self}: tensor {name!r} has shape {tuple(values[name].shape)}, "
                                f"but the model built from its config expects "
                                f"{tuple(old.shape)}.")  # fmt: skip
        holders = {}
        for module in model.modules():
            for leaf, param in module._parameters.items():
                if param is not None and param.is_meta:
                    holders.setdefault(id(param), []).append((module, leaf))
        for name, old in todo.items():
            new = nn.Parameter(values[name].to(torch.float32), requires_grad=old.requires_grad)
            for module, leaf in holders[id(old)]:  # every module holding it (tied weights)
                module._parameters[leaf] = new


class SafetensorsWeights(WeightFile):
    """A folder holding ``*.safetensors`` files, read by key (memory-mapped)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise TaskError(f"expected *.safetensors files in {self.folder}, but there are none.")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118

    def __str__(self) -> str:
        return f"the checkpoint {self.folder}"

    def names(self) -> set[str]:
        return set(self._where)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self._where[name].get_tensor(name) for name in names}


class GGUFWeights(WeightFile):
    """A GGUF file's tensors under the names (and in the row order) transformers loads them as.
    ``model`` is the architecture built from the file's config (:func:`empty_model`)."""

    def __init__(self, path: str | Path, model: nn.Module) -> None:
        try:
            import gguf
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
                load_gguf_checkpoint,
            )
        except ImportError as error:
            raise TaskError(f"reading GGUF expected the 'gguf' package ({error}). Install it "
                            "with: pip install 'compsearch[llm]'.") from None  # fmt: skip
        self.path = Path(path)
        self._gguf = gguf
        self._reader = gguf.GGUFReader(self.path)  # memory-mapped: nothing is read yet
        arch = self._reader.fields["general.architecture"].contents()
        config = load_gguf_checkpoint(str(self.path), return_tensors=False).get("config", {})
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        self._mapping = get_gguf_hf_weights_map(model, self._processor)
        self._tensors = {
            self._mapping[t.name]: t for t in self._reader.tensors if t.name in self._mapping
        }

    def __str__(self) -> str:
        return f"the GGUF file {self.path.name}"

    def names(self) -> set[str]:
        return set(self._tensors)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        import numpy as np

        out = {}
        for name in names:
            tensor = self._tensors[name]
            parsed: dict = {"tensors": {}, "config": self._processor.config}
            weights = self._gguf.dequantize(tensor.data, tensor.tensor_type)
            result = self._processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=self._mapping,
                parsed_parameters=parsed,
            )  # fmt: skip
            if result.name != tensor.name or parsed["tensors"]:
                raise TaskError(
                    f"{self}: tensor {tensor.name!r} is renamed or merged on loading "
                    f"(architecture {self._reader.fields['general.architecture'].contents()!r}); "
                    "reading it one tensor at a time is not supported — calibrate it in memory."
                )
            out[name] = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))
        return out
