"""The Task protocol: a model to compress, the data it sees and how it is judged.

Lifecycle, as the pipeline and the objectives use it:

1. ``teacher()`` builds a fresh teacher (every call returns a new, independent model in eval mode).
2. ``calibration_batches(n)`` feeds activation observers; ``train_batches(batch_size, seed)`` yields
   fine-tune / distillation batches forever, in an order fixed by ``seed``.
3. ``forward(model, batch)`` runs a model on a batch and returns :class:`Outputs` — the one place that
   knows how this task's model is called and what its output means.
4. ``task_loss(outputs, batch)`` is the supervised loss on labels, or ``None`` for a task without them.
5. ``evaluate(model, split)`` returns ``{metric: value}`` on one of the two held-out parts;
   ``primary_metric`` and ``direction`` say which one the search optimizes and which way is better.
6. ``example_inputs()`` is the batch latency is measured on: the shape the model would serve.

Three disjoint parts of the data, split deterministically and disjoint sample by sample:

* train — fine-tuning, distillation and calibration (``train_batches``, ``calibration_batches``);
* ``validation`` — everything the search decides on: trials, rungs, sensitivity, export picks;
* ``test`` — only the final report (``compsearch train``) and ``compsearch evaluate``, so the numbers
  a user reads were never used to choose what they describe.

A batch is a ``dict`` of tensors on the CPU; ``labels`` (when present) holds the targets.
Subclasses implement the abstract methods; the rest have defaults that suit most tasks.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compsearch.errors import TaskError
from compsearch.fingerprint import model_fingerprint, tensors_fingerprint

Batch = dict[str, torch.Tensor]
SPLITS = ("validation", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        from compsearch.errors import TaskError

        raise TaskError(f"split: expected one of {', '.join(SPLITS)}, but got {split!r}.")
    return split


def halves(count: int) -> tuple[slice, slice]:
    """The validation and test parts of ``count`` held-out samples: first half, second half."""
    return slice(0, count // 2), slice(count // 2, count)


@dataclass
class Outputs:
    """What a forward returns, in the form distillation and metrics need.

    ``logits`` for classifiers and language models, ``embedding`` for embedding models (exactly one of
    the two is set, matching the task's ``output_kind``); ``attentions`` per layer when asked for.
    """

    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    #: with ``logits`` holding only the top entries of a large vocabulary: which entries they are
    logit_indices: torch.Tensor | None = None

    @property
    def main(self) -> torch.Tensor:
        main = self.logits if self.logits is not None else self.embedding
        if main is None:
            raise ValueError("Outputs holds neither logits nor an embedding.")
        return main


class Task(abc.ABC):
    """A model to compress and how to judge it. See the module docstring for the lifecycle."""

    name: str
    primary_metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    output_kind: Literal["logits", "embedding"] = "logits"
    #: batch size for fine-tuning when the recipe does not set one
    default_batch_size: int = 32

    @abc.abstractmethod
    def teacher(self) -> nn.Module:
        """A fresh, independent teacher model in eval mode on the CPU."""

    @abc.abstractmethod
    def calibration_batches(self, n: int) -> list[Batch]:
        """``n`` batches for activation calibration (fixed, the same on every call)."""

    @abc.abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless stream of training batches whose order depends only on ``seed``."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        """Run ``model`` on ``batch`` (already on the model's device)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        """Metrics of ``model`` on the held-out ``split`` (``validation`` or ``test``); includes
        ``primary_metric``."""

    @abc.abstractmethod
    def example_inputs(self) -> Batch:
        """The batch latency is measured on."""

    def task_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor | None:
        """Supervised loss on ``batch['labels']``; ``None`` where the task has no labels."""
        if "labels" not in batch or outputs.logits is None:
            return None
        return nn.functional.cross_entropy(outputs.logits, batch["labels"])

    def num_train_examples(self) -> int | None:
        """How many training examples there are (for budgets in epochs); None if unknown."""
        return None

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        """Modules whose outputs feature distillation matches when the recipe names none."""
        return []

    def regions(self, model: nn.Module) -> dict[str, list[str]]:
        """Named parts of the model (e.g. vision encoder, projector, language model) by module prefix."""
        return {}

    def weight_file(self) -> tuple[nn.Module, Any]:
        """The teacher's architecture with its parameters on ``meta`` and the
        :class:`~compsearch.tasks.weights.WeightFile` its weights are read from one at a time
        (``compsearch.sequential``). Tasks whose teacher is not loaded from such a file raise."""
        raise TaskError(
            f"task {self.name!r}: calibrating one block at a time reads the teacher's weights from "
            "its GGUF or safetensors file, but this task builds its teacher in memory; "
            "calibrate it in memory (`compsearch train` without --one-block-at-a-time)."
        )

    def describe(self) -> dict[str, object]:
        """Plain-data description of the task's configuration (part of its fingerprint)."""
        return {"name": self.name}

    def fingerprint(self) -> str:
        """Identity of the teacher and the data: caches keyed by it are invalid when it changes."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            teacher = model_fingerprint(self.teacher())
            data = tensors_fingerprint(
                (t for batch in self.calibration_batches(1) for t in batch.values()),
                salt=f"{self.describe()}|{teacher}",
            )
            cached = self._fingerprint = data
        return cached


def move(batch: Batch, device: torch.device | str) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
