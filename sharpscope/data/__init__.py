"""Datasets: ``load_dataset(name, root=None, train=True)`` -> :class:`TensorData`.

Nothing is downloaded at run time. ``digits`` (scikit-learn's bundled 8x8 digits) and
``synthetic`` need no files; CIFAR-10/100 and Tiny-ImageNet are read from the official files
under ``root`` (default: ``$SHARPSCOPE_DATA`` or ``./data``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .augment import normalize, random_crop_flip
from .cifar import load_cifar
from .dataset import BatchLoader, TensorData, epoch_generator
from .digits import load_digits
from .synthetic import load_synthetic
from .tiny_imagenet import load_tiny_imagenet

__all__ = ["DATASET_NAMES", "BatchLoader", "TensorData", "default_root", "epoch_generator", "load_dataset",
           "normalize", "random_crop_flip"]

#: Names accepted by :func:`load_dataset` (case, ``-`` and ``_`` ignored).
DATASET_NAMES: tuple[str, ...] = ("digits", "synthetic", "cifar10", "cifar100", "tiny_imagenet")


def default_root() -> Path:
    """``$SHARPSCOPE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("SHARPSCOPE_DATA", "data"))


def canonical_dataset_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    for canonical in DATASET_NAMES:
        if canonical.replace("_", "") == key:
            return canonical
    raise UserInputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, train: bool = True,
                 **options: Any) -> TensorData:
    """Load a split of a dataset into memory.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: folder with the dataset files (CIFAR, Tiny-ImageNet); ignored by digits/synthetic.
        train: the training split, else the test split (Tiny-ImageNet: the labelled validation set).
        **options: reader-specific, e.g. ``num_examples``/``num_classes``/``image_size``/``seed`` for
            synthetic, ``show_progress`` for Tiny-ImageNet.

    Raises:
        UserInputError: unknown name, or files missing/malformed (the message names the expected layout).
    """
    canonical = canonical_dataset_name(name)
    base = Path(root) if root is not None else default_root()
    try:
        if canonical == "digits":
            return load_digits(train=train, **options)
        if canonical == "synthetic":
            return load_synthetic(train=train, **options)
        if canonical in ("cifar10", "cifar100"):
            return load_cifar(base, num_classes=10 if canonical == "cifar10" else 100, train=train, **options)
        return load_tiny_imagenet(base, train=train, **options)
    except TypeError as exc:
        raise UserInputError(f"bad options for dataset {canonical!r}: {exc}") from None
