"""``digits``: scikit-learn's 1,797 real 8×8 handwritten digits and a small CNN. The fastest task."""

from __future__ import annotations

import torch
from torch import nn

from compsearch.tasks.models import DigitsCNN
from compsearch.tasks.vision import ImageClassificationTask, TeacherTraining


class DigitsTask(ImageClassificationTask):
    name = "digits"
    eval_size = 500
    example_batch_size = 256
    default_batch_size = 64
    training = TeacherTraining(epochs=20, batch_size=64, lr=1e-2, max_shift=0, seed=0)

    def load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = (images - 0.3) / 0.4
        return images, torch.tensor(data.target, dtype=torch.int64)

    def build_model(self) -> nn.Module:
        return DigitsCNN()

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        return ["fc1"]


def make_task(**options) -> DigitsTask:
    return DigitsTask(**options)
