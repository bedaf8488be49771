"""Image classification tasks on in-memory tensors: the shared half of ``digits`` and ``mnist``.

A subclass supplies the data (``load_data``), the model (``build_model``) and the teacher's training
settings; this class splits the data once (a fixed permutation: ``eval_size`` held-out images, the
first half validation and the second half test, the rest train), trains the teacher once on the
train part and caches it (see :mod:`compsearch.tasks.teacher_cache`), and implements the Task
protocol on top.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from compsearch._steps import say
from compsearch.paths import teachers_dir
from compsearch.tasks.base import SPLITS as SPLIT_NAMES
from compsearch.tasks.base import Batch, Outputs, Task, check_split, halves, model_device, move
from compsearch.tasks.teacher_cache import cached_state_dict


@dataclass(frozen=True)
class TeacherTraining:
    """How the teacher is trained: fixed, so the cached teacher is reproducible."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 0  # random translation in pixels (data augmentation)
    seed: int = 0


class ImageClassificationTask(Task):
    primary_metric = "accuracy"
    direction = "maximize"
    output_kind = "logits"
    eval_size: int = 500
    example_batch_size: int = 256
    training: TeacherTraining = TeacherTraining()

    def __init__(self, runs_root: Path | None = None) -> None:
        images, labels = self.load_data()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self.eval_images, self.eval_labels = images[: self.eval_size], labels[: self.eval_size]
        self.train_images, self.train_labels = images[self.eval_size :], labels[self.eval_size :]
        self.parts = dict(zip(SPLIT_NAMES, halves(self.eval_size), strict=True))
        self._runs_root = runs_root
        self._state: dict[str, torch.Tensor] | None = None

    # -- what a subclass supplies ----------------------------------------------------------------

    @abc.abstractmethod
    def load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float ``(N, C, H, W)`` (normalized) and labels as int64 ``(N,)``."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialized (untrained) model."""

    # -- the teacher -------------------------------------------------------------------------------

    def teacher(self) -> nn.Module:
        if self._state is None:
            settings = {
                "task": self.describe(),
                "training": asdict(self.training),
                "data": self._data_digest(),
                "torch": torch.__version__.split("+")[0],
            }
            directory = teachers_dir(self._runs_root)
            self._state, _ = cached_state_dict(directory, self.name, settings, self._train_teacher)
        model = self.build_model()
        model.load_state_dict(self._state, strict=True)
        return model.eval()

    def _data_digest(self) -> str:
        from compsearch.fingerprint import tensors_fingerprint

        return tensors_fingerprint([self.train_images, self.train_labels, self.eval_images])

    def _train_teacher(self) -> tuple[nn.Module, dict[str, float]]:
        settings = self.training
        torch.manual_seed(settings.seed)
        model = self.build_model()
        steps_per_epoch = math.ceil(len(self.train_labels) / settings.batch_size)
        total = settings.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=total)
        batches = self.train_batches(settings.batch_size, settings.seed)
        model.train()
        started = time.perf_counter()
        for step in range(total):
            if step == min(20, total - 1):  # an estimate once the first steps are timed
                minutes = (time.perf_counter() - started) / step * total / 60 if step else 0.0
                say(f"training the {self.name} teacher, one time ({total} steps, about "
                    f"{max(minutes, 0.1):.1f} min; cached under the runs root's _teachers)")  # fmt: skip
            batch = next(batches)
            loss = nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        return model, self.evaluate(model)

    # -- data --------------------------------------------------------------------------------------

    def calibration_batches(self, n: int) -> list[Batch]:
        size = 64
        count = len(self.train_labels)
        return [
            {"images": self.train_images[(i * size) % count : (i * size) % count + size]}
            for i in range(n)
        ]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        for index in shuffled_batches(len(self.train_labels), batch_size, generator):
            images = self.train_images[index]
            if self.training.max_shift:
                images = random_shift(images, self.training.max_shift, generator)
            yield {"images": images, "labels": self.train_labels[index]}

    def num_train_examples(self) -> int:
        return len(self.train_labels)

    def example_inputs(self) -> Batch:
        part = self.eval_images[self.parts["validation"]]
        repeats = math.ceil(self.example_batch_size / len(part))
        images = part.repeat(repeats, 1, 1, 1)[: self.example_batch_size]
        return {"images": images.contiguous()}

    # -- running and judging -----------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        return Outputs(logits=model(batch["images"]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        part = self.parts[check_split(split)]
        images, labels = self.eval_images[part], self.eval_labels[part]
        device = model_device(model)
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(labels), 256):
            batch = move(
                {"images": images[start : start + 256], "labels": labels[start : start + 256]},
                device,
            )
            logits = self.forward(model, batch).logits.float()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        model.train(was_training)
        count = len(labels)
        return {"accuracy": correct / count, "nll": loss_sum / count}


def shuffled_batches(
    count: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless example indices: each epoch a fresh permutation, cut into full batches."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    padded = nn.functional.pad(images, [max_shift] * 4, value=float(images.min()))
    out = torch.empty_like(images)
    height, width = images.shape[-2:]
    shifts = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, dy : dy + height, dx : dx + width]
    return out
