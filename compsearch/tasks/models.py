"""The small CNNs of the built-in image tasks.

They are plain ``nn.Module`` trees with the structures compression must handle: conv → BN → ReLU
chains, residual blocks with identity and projection shortcuts, and an MLP head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv + BN, added to the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = (
            conv_bn(in_channels, out_channels, stride, kernel=1)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A small ResNet for 1-channel images: stem, stages of basic blocks, global pooling, classifier."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 1,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        stages = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels, width, stride)]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsCNN(nn.Module):
    """The 8×8 digits classifier: three conv → BN → ReLU layers and a two-layer MLP head."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), hidden: int = 64) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, 1, 1, bias=False),
            nn.BatchNorm2d(a),
            nn.ReLU(),
            nn.Conv2d(a, b, 3, 1, 1, bias=False),
            nn.BatchNorm2d(b),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc1 = nn.Linear(c, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.relu(self.fc1(x)))
