"""A data hook for your own Hugging Face text classifier — copy it beside your config and edit.

``configs/hf-example.yaml`` names it as ``hf:<model folder>@hf_example_hook:text_classification``.
compsearch imports it from the folder you run ``compsearch`` in (or from ``PYTHONPATH``), and calls
``text_classification(model_path, kind, processor)`` once per process; ``processor`` is the
tokenizer saved with the model (``save_pretrained``).

It reads ``<model folder>/data.csv`` (a header row, then ``text,label`` rows; labels are class ids)
and returns :class:`compsearch.tasks.language.HFData`: the first 80 % of the rows train (fine-tuning,
distillation, calibration), the rest are held out — compsearch keeps every other held-out batch for
the search (validation) and the others for the final report (test), so nothing it reports was used
to choose it. Rows are shuffled with a fixed seed first, so the split is the same in every process.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

from compsearch.tasks.language import HFData

BATCH_SIZE = 16
MAX_LENGTH = 64
TRAIN_FRACTION = 0.8


def text_classification(model_path: str, kind: str, processor) -> HFData:
    if kind != "sequence-classification" or processor is None:
        raise ValueError(
            f"this hook expects a sequence classifier saved with its tokenizer, got {kind!r}"
        )
    with open(Path(model_path) / "data.csv", newline="", encoding="utf-8") as handle:
        rows = [(row["text"], int(row["label"])) for row in csv.DictReader(handle)]
    random.Random(0).shuffle(rows)
    cut = int(len(rows) * TRAIN_FRACTION)

    def batches(part: list[tuple[str, int]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(part) - BATCH_SIZE + 1, BATCH_SIZE):  # full batches only
            texts, labels = zip(*part[start : start + BATCH_SIZE], strict=True)
            encoded = processor(list(texts), padding="max_length", truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt")  # fmt: skip
            out.append({"input_ids": encoded["input_ids"],
                        "attention_mask": encoded["attention_mask"],
                        "labels": torch.tensor(labels)})  # fmt: skip
        return out

    return HFData(train=batches(rows[:cut]), eval=batches(rows[cut:]))
