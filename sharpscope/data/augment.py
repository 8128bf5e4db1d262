"""Batch augmentation and normalisation in torch, on whatever device holds the batch.

The standard CIFAR pipeline (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
``Normalize(mean, std)``) applied to a whole uint8 batch at once: the images stay in device memory
as uint8 and each step costs a gather and a few element-wise kernels, instead of a CPU data loader.
Random draws come from a CPU :class:`torch.Generator`, so the same seed gives the same crops on
every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _validate


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels, crop back to the original size at a random offset, flip half.

    Args:
        images: ``(B, C, H, W)`` batch (any dtype; uint8 keeps the copy small).
        generator: CPU generator for the offsets and flips.
        padding: pixels of zero padding on each side (4 in the CIFAR recipe); 0 disables the crop.
        flip: mirror each image left-right with probability 1/2.

    Each image gets its own offset ``(dy, dx)`` uniform in ``[0, 2 padding]^2`` and its own flip,
    like torchvision's per-sample transforms (padding fills zeros in raw pixel space, i.e. black).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    padding = _validate.integer(padding, "padding", minimum=0)
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = (offsets[0][:, None] + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
        cols = (offsets[1][:, None] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indexing on dims 0, 2, 3 puts the channel axis last: (B, H, W, C).
        out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float = 255.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(images / scale - mean[c]) / std[c]`` per channel, as a float tensor."""
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {images.shape[1]} channels")
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / scale - m) / s
