"""How a task calls its model, as an ONNX graph sees it: the tensors in, the tensors out.

:func:`record_call` watches one ``task.forward`` call; :class:`Call` keeps the arguments'
structure with the tensors taken out (they become the graph's inputs; every other argument is
fixed) and the output's structure, so the graph's flat outputs can be put back into the model's own
output type (a Hugging Face ``ModelOutput`` stays one). :class:`Flat` is the model as the exporter
traces it: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from compsearch.errors import ExportError
from compsearch.tasks.base import Batch, Task


class Recorder(nn.Module):
    """Passes calls through to ``model`` and keeps the last one (and how many there were)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[tuple, dict]] = []
        self.output = None

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        self.output = self.model(*args, **kwargs)
        return self.output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class _Tensor:
    """Marks where a tensor goes in a call's flattened arguments or outputs."""

    def __repr__(self) -> str:
        return "<tensor>"


TENSOR = _Tensor()


@dataclass
class Call:
    """How the task calls its model: the arguments' structure with the tensors taken out (they
    are the graph's inputs; every other argument is fixed), and the output's structure."""

    in_spec: pytree.TreeSpec
    in_leaves: list  # TENSOR where a tensor goes
    input_names: list[str]
    output_names: list[str]
    out_spec: pytree.TreeSpec
    out_leaves: list  # TENSOR where a tensor comes back

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        fixed = [TENSOR if isinstance(v, torch.Tensor) else v for v in leaves]
        if spec != self.in_spec or fixed != self.in_leaves:
            raise ExportError(
                "expected the model to be called as when it was exported "
                f"({self.in_spec}, fixed values {self.in_leaves}), but it was called as {spec} "
                f"with {fixed}. Export again for this call."
            )
        return [v for v in leaves if isinstance(v, torch.Tensor)]

    def arguments(self, tensors) -> tuple[tuple, dict]:
        feed = iter(tensors)
        leaves = [next(feed) if v is TENSOR else v for v in self.in_leaves]
        return pytree.tree_unflatten(leaves, self.in_spec)

    def output(self, tensors):
        feed = iter(tensors)
        leaves = [next(feed) if v is TENSOR else v for v in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


def record_call(model: nn.Module, task: Task, batch: Batch) -> tuple[Call, list[torch.Tensor]]:
    """The one call ``task.forward`` makes to ``model`` on ``batch``, and its tensors."""
    recorder = Recorder(model)
    with torch.no_grad():
        task.forward(recorder, batch)
    if len(recorder.calls) != 1:
        raise ExportError(
            f"expected the task's forward to call its model once, but it called it "
            f"{len(recorder.calls)} times; an ONNX graph holds one call."
        )
    return call_of(recorder)


def call_of(recorder: Recorder) -> tuple[Call, list[torch.Tensor]]:
    args, kwargs = recorder.calls[-1]
    paths, in_spec = pytree.tree_flatten_with_path((args, kwargs))
    names = [_name(path) for path, v in paths if isinstance(v, torch.Tensor)]
    out_paths, out_spec = pytree.tree_flatten_with_path(recorder.output)
    out_leaves = [v for _, v in out_paths]
    out_names = [_name(path) or "output" for path, v in out_paths if isinstance(v, torch.Tensor)]
    for leaf in out_leaves:
        if not isinstance(leaf, (torch.Tensor, type(None), bool, int, float, str)):
            raise ExportError(
                f"expected the model's output to hold tensors, but it holds a "
                f"{type(leaf).__name__}, which an ONNX graph cannot return. Switch it off in the "
                f"task's forward (e.g. use_cache=False)."
            )
    call = Call(
        in_spec,
        [TENSOR if isinstance(v, torch.Tensor) else v for _, v in paths],
        names,
        out_names,
        out_spec,
        [TENSOR if isinstance(v, torch.Tensor) else v for v in out_leaves],
    )
    return call, [v for _, v in paths if isinstance(v, torch.Tensor)]


def _name(path) -> str:
    """A readable tensor name from its pytree path: a keyword's name, ``input_0`` for the first
    positional argument, ``last_hidden_state`` or ``output_0`` for outputs."""
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys[:1] == ["1"]:  # (args, kwargs)[1]: a keyword argument
        return "_".join(keys[1:])
    if keys[:1] == ["0"] and len(keys) > 1:
        return "input_" + "_".join(keys[1:])
    return "_".join(keys) if not keys or not keys[0].isdigit() else "output_" + "_".join(keys)


class Flat(nn.Module):
    """The model as the graph sees it: tensors in (the call's), tensors out."""

    def __init__(self, model: nn.Module, call: Call) -> None:
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.arguments(tensors)
        leaves = pytree.tree_leaves(self.model(*args, **kwargs))
        return tuple(v for v in leaves if isinstance(v, torch.Tensor))
