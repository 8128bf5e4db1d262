"""Optional BatchNorm bypass for the second (perturbed) pass of a sharpness-aware step.

By default (as in the paper's code) BatchNorm running statistics are updated in both passes, so
they also absorb the batch statistics at the perturbed point ``w + e``. Wrapping pass 2 in
:func:`frozen_running_stats` keeps them as they were after pass 1, while the layers still
normalise with the batch statistics (training mode; ``eval()`` would change the loss itself)::

    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    with frozen_running_stats(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["frozen_running_stats"]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze the running statistics of every BatchNorm layer of ``model`` inside the block.

    Sets ``momentum = 0`` (running mean/var unchanged by the update) on each ``_BatchNorm``
    (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) that tracks running statistics, and on exit
    restores each layer's momentum (``None``, the cumulative average, included) and its
    ``num_batches_tracked`` counter, which the forward pass increments regardless of momentum.
    Layers are never switched to ``eval()``.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            counter = module.num_batches_tracked
            saved.append((module, module.momentum, None if counter is None else counter.clone()))
            module.momentum = 0.0
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, momentum, counter in saved:
                module.momentum = momentum
                if counter is not None:
                    module.num_batches_tracked.copy_(counter)
