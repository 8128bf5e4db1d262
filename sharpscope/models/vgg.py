"""VGG-16 with batch normalisation (Simonyan & Zisserman 2015), in its usual CIFAR form.

Thirteen 3x3 conv-BN-ReLU layers in five blocks separated by 2x2 max pooling; the ImageNet
classifier (three large linear layers) is replaced by global average pooling and a single
``Linear(512, num_classes)``, as in the CIFAR code bases the SAM papers use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output channels of each conv layer; "M" is a 2x2 max pooling.
VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """VGG with batch norm and a global-average-pooled linear head.

    Args:
        num_classes: size of the output layer.
        in_channels: channels of the input images.
        layers: conv widths and ``"M"`` pooling markers (VGG-16 by default).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 layers: tuple[int | str, ...] = VGG16_LAYERS) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = in_channels
        for item in layers:
            if item == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                modules += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                            nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)
