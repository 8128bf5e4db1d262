"""Small models for the embedded 8x8 digits data: an MLP and a two-layer CNN.

They train in seconds on a CPU, which makes them the models of the tests, the notebooks and the demo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``Linear-ReLU`` hidden layers and a linear output layer.

    Args:
        num_classes: size of the output layer.
        in_features: number of input values per example (64 for 8x8 digits).
        hidden: widths of the hidden layers.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.in_features = in_features
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP built for {self.in_features} input values per example, got {x.shape[1]}; "
                             f"pass in_features= to build_model")
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv-BN-ReLU layers (the second with stride 2), global average pooling, linear head.

    Args:
        num_classes: size of the output layer.
        in_channels: channels of the input images (1 for digits).
        width: channels of the first conv layer (the second has twice as many).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)
        for module in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
