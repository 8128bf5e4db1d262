"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set).

1797 grey images with values 0..16, 10 classes. sharpscope uses one fixed stratified split,
1437 training and 360 test images (``train_test_split(test_size=360, stratify=y, random_state=0)``),
so results on "digits" are comparable across runs and machines. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import TensorData

TEST_SIZE = 360
SPLIT_SEED = 0


def load_digits(train: bool = True) -> TensorData:
    """The digits split as uint8 ``(N, 1, 8, 8)`` images (values 0..16), normalised by the training statistics."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # exact: the values are the integers 0..16
    target = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(target)), test_size=TEST_SIZE, stratify=target,
                                           random_state=SPLIT_SEED)
    train_pixels = images[idx_train].astype(np.float64) / 16.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    idx = np.sort(idx_train if train else idx_test)
    return TensorData(inputs=torch.from_numpy(images[idx].copy()), targets=torch.from_numpy(target[idx].copy()),
                      num_classes=10, name=f"digits/{'train' if train else 'test'}", mean=(mean,), std=(std,),
                      scale=16.0, augment=False, classes=[str(i) for i in range(10)])
