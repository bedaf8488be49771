"""The teacher's outputs on distillation batches: a cache for a study, a stream for the final run.

The outputs are computed once and kept in memory and on disk (:class:`TeacherCache`), keyed by the
task's fingerprint and the batches themselves, so trials read them and never run the teacher on a
cached batch. A run longer than a pool (the final run) streams them instead (:class:`TeacherStream`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compsearch._steps import say
from compsearch.errors import KernelError
from compsearch.fingerprint import tensors_fingerprint
from compsearch.kernels.distill import TeacherOutputs, capture_features, eager_attention
from compsearch.tasks.base import Batch, Task, move

log = logging.getLogger(__name__)
CACHE_FORMAT = 1
SPARSE_VOCAB = 1024  # logits wider than this are cached as their top TOP_LOGITS entries
TOP_LOGITS = 64


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: ``batches`` batches of ``batch_size`` from ``train_batches(seed)``, with
    the teacher's main output, the named features and (optionally) its last attention map."""

    batches: int
    batch_size: int
    seed: int = 0
    feature_layers: tuple[str, ...] = ()
    attentions: bool = False


class TeacherCache:
    """Teacher outputs on a fixed pool of distillation batches, computed once per task and data.

    The pool is the first ``spec.batches`` batches of ``task.train_batches(batch_size, seed)``.
    With ``directory``, the pool and the outputs are stored in one safetensors file named by the
    key (task fingerprint + spec + the batches' contents): a changed task or data gets a new file;
    a damaged file is recomputed. ``teacher_runs`` counts teacher forwards (tests use it).
    """

    def __init__(
        self,
        task: Task,
        spec: CacheSpec,
        directory: Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if spec.batches < 1:
            raise KernelError(f"cache batches: expected at least 1, but got {spec.batches}.")
        self.task, self.spec, self.directory = task, spec, directory
        self.device = torch.device(device)
        self.teacher_runs = 0
        stream = task.train_batches(spec.batch_size, spec.seed)
        self.batches: list[Batch] = [next(stream) for _ in range(spec.batches)]
        data = tensors_fingerprint(t for b in self.batches for t in b.values())
        text = json.dumps(
            {"format": CACHE_FORMAT, "task": task.fingerprint(), "data": data, **spec.__dict__},
            sort_keys=True,
        )
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._outputs: list[TeacherOutputs] | None = None

    @property
    def path(self) -> Path | None:
        return (
            None if self.directory is None else self.directory / f"teacher-{self.key}.safetensors"
        )

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int, device: torch.device | str = "cpu") -> tuple[Batch, TeacherOutputs]:
        outputs = self._load()
        batch = move(self.batches[index % len(outputs)], device)
        return batch, _on(outputs[index % len(outputs)], device)

    def _load(self) -> list[TeacherOutputs]:
        if self._outputs is None:
            self._outputs = self._read() or self._compute()
        return self._outputs

    def _read(self) -> list[TeacherOutputs] | None:
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            return [self._unpack(tensors, i) for i in range(len(self.batches))]
        except Exception as error:  # damaged: recompute rather than trust it
            log.warning("teacher cache %s is unreadable (%s); recomputing it", path, error)
            return None

    def _unpack(self, tensors: dict[str, torch.Tensor], i: int) -> TeacherOutputs:
        kind = "logits" if f"{i}.logits" in tensors else "embedding"
        features = {
            name: tensors[f"{i}.feature.{name}"].float() for name in self.spec.feature_layers
        }
        attention = tensors[f"{i}.attention"].float() if self.spec.attentions else None
        indices = tensors.get(f"{i}.indices")
        return TeacherOutputs(tensors[f"{i}.{kind}"], kind, features, attention, indices)

    def index(self, step: int, seed: int) -> int:
        """Which cached batch a training step uses: each pass over the pool in its own order."""
        epoch, position = divmod(step, len(self.batches))
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return int(torch.randperm(len(self.batches), generator=generator)[position])

    @torch.no_grad()
    def _compute(self) -> list[TeacherOutputs]:
        say(
            f"building the teacher cache, one time ({len(self.batches)} batches of the teacher's "
            "outputs for distillation)"
        )
        teacher = self.task.teacher().to(self.device)
        outputs = []
        with _teacher_context(teacher, self.spec) as found:
            for batch in self.batches:
                outputs.append(_teacher_outputs(self.task, teacher, batch, self.spec, found,
                                                self.device))  # fmt: skip
                self.teacher_runs += 1
        self._write(outputs)
        return outputs

    def _write(self, outputs: list[TeacherOutputs]) -> None:
        path = self.path
        if path is None:
            return
        tensors = {}
        for i, out in enumerate(outputs):
            tensors[f"{i}.{out.kind}"] = out.main.contiguous()
            if out.indices is not None:
                tensors[f"{i}.indices"] = out.indices.contiguous()
            for name, value in out.features.items():
                tensors[f"{i}.feature.{name}"] = value.to(torch.float16).contiguous()
            if out.attention is not None:
                tensors[f"{i}.attention"] = out.attention.to(torch.float16).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        save_file(tensors, str(temp), metadata={"key": self.key})
        temp.replace(path)


class TeacherStream:
    """Teacher outputs computed as training reaches each batch, for runs longer than a cache pool
    (the final run): step ``i`` trains on the ``i``-th batch of ``task.train_batches`` — a fresh
    shuffle every epoch, augmentation included — so a run sees all the data it claims to, at the
    cost of one teacher forward per step. Same interface as :class:`TeacherCache`; resuming at step
    ``k`` regenerates the stream up to ``k`` (data only, no teacher forwards)."""

    def __init__(self, task: Task, spec: CacheSpec, device: torch.device | str = "cpu") -> None:
        self.task, self.spec, self.device = task, spec, torch.device(device)
        self.teacher_runs = 0
        self._teacher: nn.Module | None = None
        self._stream: Iterator[Batch] | None = None
        self._position = 0
        self._last: tuple[int, Batch, TeacherOutputs] | None = None

    def __len__(self) -> int:
        """Batches in one epoch of the training data."""
        examples = self.task.num_train_examples() or self.spec.batch_size
        return max(1, examples // self.spec.batch_size)

    def index(self, step: int, seed: int) -> int:
        return step

    def _batch(self, index: int) -> Batch:
        if self._stream is None or index < self._position:
            self._stream = self.task.train_batches(self.spec.batch_size, self.spec.seed)
            self._position = 0
        while self._position < index:
            next(self._stream)
            self._position += 1
        self._position += 1
        return next(self._stream)

    @torch.no_grad()
    def get(self, index: int, device: torch.device | str = "cpu") -> tuple[Batch, TeacherOutputs]:
        if self._last is None or self._last[0] != index:
            if self._teacher is None:
                self._teacher = self.task.teacher().to(self.device)
            batch = self._batch(index)
            with _teacher_context(self._teacher, self.spec) as found:
                outputs = _teacher_outputs(self.task, self._teacher, batch, self.spec, found,
                                           self.device)  # fmt: skip
            self.teacher_runs += 1
            self._last = (index, batch, outputs)
        _, batch, cached = self._last
        return move(batch, device), _on(cached, device)


@contextlib.contextmanager
def _teacher_context(teacher: nn.Module, spec: CacheSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Feature capture (and eager attention, when attention maps are wanted) around teacher runs."""
    attention_context = eager_attention(teacher) if spec.attentions else _nothing()
    with capture_features(teacher, list(spec.feature_layers)) as found, attention_context:
        yield found


def _teacher_outputs(
    task: Task, teacher: nn.Module, batch: Batch, spec: CacheSpec, found: dict, device
) -> TeacherOutputs:
    """The teacher's outputs on one batch, in the stored form the losses read."""
    result = task.forward(teacher, move(batch, device), attentions=spec.attentions)
    attention = None
    if spec.attentions:
        if not result.attentions:
            raise KernelError(
                f"attention distillation: expected the {task.name} task's model to return "
                "attention maps, but it returned none. Set attn_weight: 0."
            )
        attention = _as_stored(result.attentions[-1])
    kind = "logits" if result.logits is not None else "embedding"
    main, indices = result.main.detach().float().cpu(), None
    if kind == "logits" and main.shape[-1] > SPARSE_VOCAB:
        main, indices = main.topk(TOP_LOGITS, dim=-1)
    features = {name: _as_stored(found[name]) for name in spec.feature_layers}
    return TeacherOutputs(main, kind, features, attention, indices)


def _on(outputs: TeacherOutputs, device: torch.device | str) -> TeacherOutputs:
    return TeacherOutputs(
        outputs.main.to(device),
        outputs.kind,
        {k: v.to(device) for k, v in outputs.features.items()},
        None if outputs.attention is None else outputs.attention.to(device),
        None if outputs.indices is None else outputs.indices.to(device),
    )


def _as_stored(tensor: torch.Tensor) -> torch.Tensor:
    """Features and attention maps are stored as float16: use exactly that in memory too, so a
    trial sees the same numbers whether the cache was just computed or read from disk."""
    return tensor.detach().to(torch.float16).float().cpu()


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield
