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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from compsearch.errors import ExportError
from compsearch.exports.onnx_call import Call, Flat, Recorder, call_of, record_call
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
    #: the deploy form it was traced from, to trace again where a call's shapes need their own
    #: graph
    source: nn.Module | None = field(default=None, repr=False, compare=False)

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
    (default: the task's example inputs, the shape it serves). The file appears whole or not at
    all."""
    require_onnx()
    batch = task.example_inputs() if batch is None else batch
    source = copy.deepcopy(model).cpu().float().eval()
    _without_cache(source)
    call, tensors = record_call(source, task, batch)
    try:
        return _write(source, call, tuple(tensors), Path(path))
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


def _write(source: nn.Module, call: Call, tensors: tuple, path: Path) -> OnnxExport:
    """Trace ``source`` (a deploy form; a copy of it is put in its ONNX form) on ``tensors`` into
    ``path``, every dimension free where the model allows."""
    model = copy.deepcopy(source)
    forms = onnx_form_(model)
    auto = torch.export.Dim.AUTO
    shapes = tuple({d: auto for d in range(t.dim())} for t in tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with _quiet():
            program = torch.onnx.export(Flat(model, call), tensors, dynamo=True,
                                        custom_translation_table=_translations(),
                                        dynamic_shapes=(shapes,), opset_version=OPSET,
                                        input_names=call.input_names,
                                        output_names=call.output_names,
                                        external_data=False, verbose=False)  # fmt: skip
        program.save(temp)
        kernels = _finish_graph(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    runs_on = {layer: kernels.get(f"model.{layer}.codes.codes", GATHER if "gathered" in form
                                  else FLOAT) for layer, form in forms.items()}  # fmt: skip
    return OnnxExport(path, path.stat().st_size, forms, runs_on, call, source)


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
    options.log_severity_level = 4  # a graph that cannot run a shape raises; the retrace handles it
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An exported graph in an ONNX Runtime session, called like the model it came from.

    A trace can hold a loop over a dimension that the graph then leaves free: a model that loops
    over its batch in Python (Llava splits its image features into a list) traces into a graph
    that fails below the traced batch size and silently drops rows above it. So the first call at
    each new set of input shapes is checked against the deploy form it was traced from (same
    outputs, same shapes, relative error within :data:`SHAPE_CHECK`); where it fails, the model
    is traced again at those shapes into a graph of their own (``retraced`` lists them), which
    must pass the same check.
    """

    def __init__(self, exported: OnnxExport, threads: int | None = 2) -> None:
        super().__init__()
        self.exported, self.threads = exported, threads
        self.session = session(exported.path, threads)
        self.by_shape: dict[tuple, tuple] = {}
        self.retraced: list[tuple] = []
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != len(exported.call.input_names):
            raise ExportError(
                f"expected the graph to read {len(exported.call.input_names)} tensors "
                f"({', '.join(exported.call.input_names)}), but it reads "
                f"{len(self.input_names)}; export again."
            )

    def forward(self, *args, **kwargs):
        tensors = self.exported.call.tensors(args, kwargs)
        shapes = tuple(tuple(t.shape) for t in tensors)
        feeds = {name: t.detach().cpu().numpy()
                 for name, t in zip(self.input_names, tensors, strict=True)}  # fmt: skip
        if shapes not in self.by_shape:
            self.by_shape[shapes] = self._runner_for(args, kwargs, feeds, shapes)
        runner, call = self.by_shape[shapes]
        return call.output([torch.from_numpy(o) for o in runner.run(None, feeds)])

    def _runner_for(self, args: tuple, kwargs: dict, feeds: dict, shapes: tuple):
        """The session (and call) that computes the model at ``shapes``: the exported graph where
        it matches the deploy form there, else one traced at these shapes."""
        primary = (self.session, self.exported.call)
        if self.exported.source is None:
            return primary
        with torch.no_grad():
            leaves = pytree.tree_leaves(self.exported.source(*args, **kwargs))
        expected = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        try:
            if _matches(self.session.run(None, feeds), expected):
                return primary
        except Exception:  # ONNX Runtime's own errors: the graph cannot run at these shapes
            pass
        runner, call = self._traced_at(args, kwargs)
        self.retraced.append(shapes)
        if not _matches(runner.run(None, feeds), expected):
            raise ExportError(
                f"expected the ONNX graph traced at input shapes {shapes} to compute the model "
                "there, but its outputs differ from the deploy form's. Please report it."
            )
        return runner, call

    def remove_files(self) -> None:
        """Delete the graph files behind this model (the sessions have read them)."""
        path = self.exported.path
        for stale in (path, *path.parent.glob(f"{path.stem}-*{path.suffix}")):
            stale.unlink(missing_ok=True)

    def _traced_at(self, args: tuple, kwargs: dict):
        """A session and call traced at these arguments' shapes (its outputs may differ too)."""
        recorder = Recorder(self.exported.source)
        with torch.no_grad():
            recorder(*args, **kwargs)
        call, tensors = call_of(recorder)
        path = self.exported.path
        shaped = path.with_name(f"{path.stem}-{len(self.retraced) + 1}{path.suffix}")
        again = _write(self.exported.source, call, tuple(tensors), shaped)
        return session(again.path, self.threads), call

    def extra_repr(self) -> str:
        return f"{self.exported.path.name}, {self.exported.size_bytes} bytes"


#: the relative output error beyond which a graph is taken not to compute the model at a shape:
#: above the rounding flips int8 levels compound into (12 % on minilm, see exports.artifact),
#: below a graph that drops rows or computes another function
SHAPE_CHECK = 0.5


def _matches(outputs: list, expected: list[torch.Tensor]) -> bool:
    if len(outputs) != len(expected):
        return False
    for got, want in zip(outputs, expected, strict=True):
        want = want.detach().float().cpu()
        if tuple(got.shape) != tuple(want.shape):
            return False
        scale = float(want.norm()) or 1.0
        if float((torch.from_numpy(got).float() - want).norm()) / scale > SHAPE_CHECK:
            return False
    return True


def onnxruntime_form(model: nn.Module, task: Task, folder: str | os.PathLike,
                     threads: int | None = 2) -> OnnxRuntimeModel:  # fmt: skip
    """``model`` exported into ``folder`` and loaded in an ONNX Runtime session."""
    handle, name = tempfile.mkstemp(dir=folder, prefix="model-", suffix=".onnx")
    os.close(handle)
    return OnnxRuntimeModel(export_onnx(model, task, name), threads)
