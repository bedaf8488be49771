"""ONNX export of the deploy form, and the ONNX Runtime session that stands in for it.

:func:`export_onnx` writes ``model.onnx`` from a deploy-form model: its quantized layers in their
ONNX form (:mod:`compsearch.exports.onnx_layers`), pruned shapes as they are, everything else as
the float graph ``torch.onnx.export`` (dynamo) traces. The graph's inputs and outputs are the
tensors the task passes to the model and gets back — recorded from one ``task.forward`` call —
with every dimension left free where the model allows, so batches of any size and length run.

:class:`OnnxRuntimeModel` is an ``nn.Module`` that runs such a file in an ONNX Runtime session and
returns the model's own output structure (a Hugging Face ``ModelOutput`` stays one), so the task's
``forward`` and ``evaluate`` — and latency measurement — use it exactly like the PyTorch model.
Sessions run on the CPU with the study's thread count and no spinning threads (a spinning pool
would take the cores from the reference it is timed beside).

ONNX Runtime is the ``onnx`` extra: ``pip install 'compsearch[onnx]'``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from compsearch.errors import ExportError
from compsearch.exports.onnx_layers import OPSET, onnx_form_
from compsearch.tasks.base import Batch, Task

EXTRA = "pip install 'compsearch[onnx]'"


def require_onnx():
    """The ``onnxruntime`` module; a missing extra is one line naming it."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError as missing:
        raise ExportError(
            f"ONNX export and the onnxruntime runtime need the onnx extra ({missing.name} is not "
            f"installed): {EXTRA}"
        ) from None
    return onnxruntime


# -- the call the task makes -----------------------------------------------------------------------


class _Recorder(nn.Module):
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


@dataclass
class Call:
    """How the task calls its model: the arguments' structure with the tensors taken out (they
    are the graph's inputs; every other argument is fixed), and the output's structure."""

    in_spec: pytree.TreeSpec
    in_leaves: list  # None where a tensor goes
    input_names: list[str]
    output_names: list[str]
    out_spec: pytree.TreeSpec
    out_leaves: list  # None where a tensor comes back

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        fixed = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        if spec != self.in_spec or fixed != self.in_leaves:
            raise ExportError(
                "expected the model to be called as when it was exported "
                f"({self.in_spec}, fixed values {self.in_leaves}), but it was called as {spec} "
                f"with {fixed}. Export again for this call."
            )
        return [v for v in leaves if isinstance(v, torch.Tensor)]

    def arguments(self, tensors) -> tuple[tuple, dict]:
        feed = iter(tensors)
        leaves = [next(feed) if v is None else v for v in self.in_leaves]
        return pytree.tree_unflatten(leaves, self.in_spec)

    def output(self, tensors):
        feed = iter(tensors)
        leaves = [next(feed) if v is None else v for v in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


def record_call(model: nn.Module, task: Task, batch: Batch) -> tuple[Call, list[torch.Tensor]]:
    """The one call ``task.forward`` makes to ``model`` on ``batch``, and its tensors."""
    recorder = _Recorder(model)
    with torch.no_grad():
        task.forward(recorder, batch)
    if len(recorder.calls) != 1:
        raise ExportError(
            f"expected the task's forward to call its model once, but it called it "
            f"{len(recorder.calls)} times; an ONNX graph holds one call."
        )
    args, kwargs = recorder.calls[0]
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
        [None if isinstance(v, torch.Tensor) else v for _, v in paths],
        names,
        out_names,
        out_spec,
        [None if isinstance(v, torch.Tensor) else v for v in out_leaves],
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


class _Flat(nn.Module):
    """The model as the graph sees it: tensors in (the call's), tensors out."""

    def __init__(self, model: nn.Module, call: Call) -> None:
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.arguments(tensors)
        leaves = pytree.tree_leaves(self.model(*args, **kwargs))
        return tuple(v for v in leaves if isinstance(v, torch.Tensor))


# -- export ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxExport:
    """What an export wrote: the file, its bytes, each layer's ONNX form and the ONNX Runtime
    kernel it runs on, and the call it holds."""

    path: Path
    size_bytes: int
    forms: dict[str, str]
    #: per quantized layer: the ONNX Runtime operator that reads its integer codes, or how its
    #: weight became float (see _finish_graph)
    kernels: dict[str, str]
    call: Call

    @property
    def integer_layers(self) -> list[str]:
        return [name for name, kernel in self.kernels.items() if not kernel.startswith(FLOAT)]


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and its notes about packages this project does not use."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: nn.Module, task: Task, path: str | os.PathLike,
                batch: Batch | None = None) -> OnnxExport:  # fmt: skip
    """Write ``model`` (a deploy form, left unchanged) as ONNX to ``path``, traced on ``batch``
    (default: the task's first calibration batch). The file appears whole or not at all."""
    require_onnx()
    path = Path(path)
    batch = task.calibration_batches(1)[0] if batch is None else batch
    exported = copy.deepcopy(model).cpu().float().eval()
    _without_cache(exported)
    call, tensors = record_call(exported, task, batch)
    forms = onnx_form_(exported)
    tensors = tuple(tensors)
    auto = torch.export.Dim.AUTO
    shapes = tuple({d: auto for d in range(t.dim())} for t in tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with _quiet():
            program = torch.onnx.export(_Flat(exported, call), tensors, dynamo=True,
                                        custom_translation_table=_translations(),
                                        dynamic_shapes=(shapes,), opset_version=OPSET,
                                        input_names=call.input_names,
                                        output_names=call.output_names,
                                        external_data=False, verbose=False)  # fmt: skip
        program.save(temp)
        kernels = _finish_graph(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except ExportError:
        raise
    except Exception as error:
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        reason = (str(root).strip().splitlines() or [""])[0]
        raise ExportError(
            f"ONNX export of {type(model).__name__} failed ({type(root).__name__}: {reason}); "
            "nothing was written."
        ) from error
    finally:
        Path(temp).unlink(missing_ok=True)
    runs_on = {layer: kernels.get(f"model.{layer}.codes.codes", GATHER if "gathered" in form
                                  else FLOAT) for layer, form in forms.items()}  # fmt: skip
    return OnnxExport(path, path.stat().st_size, forms, runs_on, call)


def _translations() -> dict:
    """ATen operators the exporter has no ONNX function for, written here: ``_is_all_true``
    (the shape checks Hugging Face models make with ``torch._check``, e.g. Llava's image tokens)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def is_all_true(values):
        as_int = op.Cast(values, to=ir.DataType.INT64)
        return op.Cast(op.ReduceMin(as_int, keepdims=False), to=ir.DataType.BOOL)

    return {torch.ops.aten._is_all_true.default: is_all_true}


def _without_cache(model: nn.Module) -> None:
    """A graph holds one forward: a Hugging Face model's key/value cache (the state of a decoding
    loop, returned as a Cache object) is switched off in the copy being exported."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for part in (config, getattr(config, "text_config", None)):
            if getattr(part, "use_cache", False):
                part.use_cache = False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FLOAT = "float"
GATHER = "Gather (integer rows, scaled)"
FOLDED = "float (no integer kernel fits: stored dequantized)"
AT_LOAD = "float (dequantized by ONNX Runtime at load)"


def _finish_graph(path: str) -> dict[str, str]:
    """Rewrite the exported file at ``path`` for what ONNX Runtime makes of it, and say so: a
    weight's DequantizeLinear that ONNX Runtime neither fuses into an integer kernel nor folds at
    load would dequantize on every run, so it becomes the float weight it computes (bit-equal);
    the exporter's per-node notes (source lines on this machine) go. Returns, per codes tensor,
    the ONNX Runtime operator that reads it (an integer kernel), :data:`FOLDED` or
    :data:`AT_LOAD`."""
    import onnx
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        ort = require_onnx()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        readers = [(n.op_type, list(n.input)) for n in onnx.load(optimized).graph.node]
    model = onnx.load(path)
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    kernels: dict[str, str] = {}
    replaced: set[str] = set()
    for node in list(graph.node):
        del node.metadata_props[:]
        node.doc_string = ""
        if node.op_type != "DequantizeLinear" or node.input[0] not in stored:
            continue
        codes = node.input[0]
        # ONNX Runtime may rename what it prepacks (``<codes>_T``)
        reader = [op for op, inputs in readers if any(i.startswith(codes) for i in inputs)]
        if reader != ["DequantizeLinear"]:
            kernels[codes] = reader[0] if reader else AT_LOAD
            continue
        values, scale, zero = (numpy_helper.to_array(stored[n]) for n in node.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = _dequantize(values, scale, zero, attrs.get("axis", 1), attrs.get("block_size", 0))
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
        kernels[codes] = FOLDED
        replaced.update(node.input)
    used = {name for n in graph.node for name in n.input}
    for tensor in list(graph.initializer):
        if tensor.name in replaced and tensor.name not in used:
            graph.initializer.remove(tensor)
    onnx.save(model, path)
    return kernels


def _dequantize(codes, scale, zero, axis: int, block_size: int):
    """DequantizeLinear as the ONNX spec defines it, in float32: ``(codes − zero) · scale``,
    per tensor, per ``axis`` or per block of ``block_size`` along it."""
    import numpy as np

    if scale.ndim == 0:
        return ((codes.astype(np.float32) - np.float32(zero)) * scale).astype(np.float32)
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis)
        zero = np.repeat(zero, block_size, axis=axis)
    else:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    values = codes.astype(np.float32) - zero.astype(np.float32)
    return (values * scale).astype(np.float32)


# -- running it ------------------------------------------------------------------------------------


def session(path: str | os.PathLike, threads: int | None = 2):
    """An ONNX Runtime CPU session on ``path``, every graph optimization on, ``threads`` intra-op
    threads (None: ONNX Runtime's default) and no spinning."""
    ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An exported graph in an ONNX Runtime session, called like the model it came from."""

    def __init__(self, exported: OnnxExport, threads: int | None = 2) -> None:
        super().__init__()
        self.exported = exported
        self.session = session(exported.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != len(exported.call.input_names):
            raise ExportError(
                f"expected the graph to read {len(exported.call.input_names)} tensors "
                f"({', '.join(exported.call.input_names)}), but it reads "
                f"{len(self.input_names)}; export again."
            )

    def forward(self, *args, **kwargs):
        tensors = self.exported.call.tensors(args, kwargs)
        feeds = {name: t.detach().cpu().numpy()
                 for name, t in zip(self.input_names, tensors, strict=True)}  # fmt: skip
        outputs = self.session.run(None, feeds)
        return self.exported.call.output([torch.from_numpy(o) for o in outputs])

    def extra_repr(self) -> str:
        return f"{self.exported.path.name}, {self.exported.size_bytes} bytes"


def onnxruntime_form(model: nn.Module, task: Task, folder: str | os.PathLike,
                     threads: int | None = 2) -> OnnxRuntimeModel:  # fmt: skip
    """``model`` exported into ``folder`` and loaded in an ONNX Runtime session."""
    handle, name = tempfile.mkstemp(dir=folder, prefix="model-", suffix=".onnx")
    os.close(handle)
    return OnnxRuntimeModel(export_onnx(model, task, name), threads)
