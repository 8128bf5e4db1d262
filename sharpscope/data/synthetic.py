"""Random CIFAR-shaped data for smoke tests and benchmarks (no files needed).

Each class has a fixed random prototype image; an example is its prototype plus pixel noise,
stored as uint8. The classes are therefore learnable (a model's loss goes down), and the data is
fully determined by ``seed``; train and test splits use different noise.
"""

from __future__ import annotations

import torch

from .. import _validate
from .dataset import TensorData


def load_synthetic(train: bool = True, num_examples: int | None = None, num_classes: int = 10,
                   image_size: int = 32, channels: int = 3, seed: int = 0) -> TensorData:
    """``num_examples`` (5000 train / 1000 test by default) images of shape ``(channels, image_size, image_size)``."""
    n = _validate.positive_int(num_examples if num_examples is not None else (5000 if train else 1000),
                               "num_examples")
    for value, name in ((num_classes, "num_classes"), (image_size, "image_size"), (channels, "channels")):
        _validate.positive_int(value, name)
    seed = _validate.integer(seed, "seed", minimum=None)
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=g)
    g.manual_seed(seed * 2 + (1 if train else 2))
    targets = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn(n, channels, image_size, image_size, generator=g)
    pixels = (127.5 + 40.0 * prototypes[targets] + 40.0 * noise).round().clamp(0, 255).to(torch.uint8)
    # Statistics of the distribution (mean 127.5, std sqrt(40^2 + 40^2)), not of the sample.
    return TensorData(inputs=pixels, targets=targets, num_classes=num_classes,
                      name=f"synthetic/{'train' if train else 'test'}", mean=(0.5,) * channels,
                      std=((2 * 40.0**2) ** 0.5 / 255.0,) * channels, scale=255.0, augment=True)
