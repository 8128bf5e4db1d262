"""``TensorData``: a whole labelled image dataset held in two tensors.

All the datasets sharpscope reads fit in memory (CIFAR-10 is 150 MB as uint8), so there is no
per-example loading: a batch is an index into ``inputs``, then augmentation and normalisation run
on the batch in torch (see :mod:`sharpscope.data.augment`). Batch order and augmentation are drawn
from a CPU generator seeded by ``(seed, epoch)``, so an epoch's batches can be replayed exactly, on
any device, which is what makes training resumable bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .. import _validate
from .augment import normalize, random_crop_flip


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for one epoch's order and augmentation (independent streams per epoch)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return g


@dataclass
class TensorData:
    """A labelled image dataset in memory.

    Attributes:
        inputs: ``(N, C, H, W)`` images, uint8 (raw pixels, divided by ``scale`` when normalised)
            or float (used as is by :meth:`normalized` when ``scale`` is 1 and mean/std are 0/1).
        targets: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        num_classes: number of classes.
        name: dataset name, with the split (``"cifar10/train"``).
        mean, std: per-channel statistics of ``inputs / scale`` used for normalisation.
        scale: divisor turning stored values into [0, 1] (255 for 8-bit images, 16 for digits).
        augment: whether training batches use crop + flip by default (True for natural images).
        classes: optional class names.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0
    augment: bool = True
    classes: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4:
            raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(self.inputs.shape)}")
        if self.targets.shape != (self.inputs.shape[0],):
            raise ValueError(f"targets must have shape ({self.inputs.shape[0]},), got {tuple(self.targets.shape)}")
        if self.targets.dtype != torch.int64:
            self.targets = self.targets.long()
        if len(self) and (int(self.targets.min()) < 0 or int(self.targets.max()) >= self.num_classes):
            raise ValueError(f"targets must lie in [0, {self.num_classes}), got "
                             f"[{int(self.targets.min())}, {int(self.targets.max())}]")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} entries, got {len(self.mean)}/{len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def channels(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.inputs.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def to(self, device: torch.device | str) -> TensorData:
        """A copy with the tensors on ``device`` (the storage dtype is kept: uint8 stays uint8)."""
        return dataclasses.replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device))

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> TensorData:
        """The examples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.inputs.device)
        return dataclasses.replace(self, inputs=self.inputs[idx], targets=self.targets[idx],
                                   name=name or f"{self.name}[{len(idx)}]")

    def normalized(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored values to the normalised float inputs the models see."""
        return normalize(images, self.mean, self.std, self.scale, dtype)

    def tensors(self, n: int | None = None, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples (all by default) as one normalised float batch ``(inputs, targets)``."""
        if n is not None:
            n = _validate.positive_int(n, "n (examples)")
        stop = len(self) if n is None else min(n, len(self))
        x, y = self.inputs[:stop], self.targets[:stop]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return self.normalized(x), y

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                augment: bool | None = None, device: torch.device | str | None = None,
                drop_last: bool = False, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(inputs, targets)`` batches.

        Args:
            batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
            shuffle: random order, drawn from the generator of ``(seed, epoch)``.
            seed, epoch: select the random stream; the same pair replays the same batches.
            augment: random crop (padding 4) + flip; ``None`` uses the dataset's default
                (:attr:`augment`) when shuffling and no augmentation otherwise.
            device: where the batches go (the gather and augmentation run there if the data is there).
            drop_last: skip a final incomplete batch.
        """
        batch_size = _validate.positive_int(batch_size, "batch_size")
        g = epoch_generator(seed, epoch)
        if augment is None:
            augment = self.augment and shuffle
        order = torch.randperm(len(self), generator=g) if shuffle else torch.arange(len(self))
        order = order.to(self.inputs.device)
        for i in range(self.num_batches(batch_size, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = self.inputs[idx], self.targets[idx]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment:
                x = random_crop_flip(x, g)
            yield self.normalized(x, dtype), y

    def loader(self, batch_size: int = 256, shuffle: bool = False, seed: int = 0, augment: bool | None = None,
               device: torch.device | str | None = None, drop_last: bool = False) -> BatchLoader:
        """A re-iterable of batches (for the analyses, which walk the data several times)."""
        return BatchLoader(self, batch_size, shuffle, seed, augment, device, drop_last)


@dataclass
class BatchLoader:
    """Re-iterable view of :meth:`TensorData.batches`; each pass advances ``epoch`` when shuffling."""

    data: TensorData
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    augment: bool | None = None
    device: torch.device | str | None = None
    drop_last: bool = False
    epoch: int = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.data.batches(self.batch_size, self.shuffle, self.seed, self.epoch, self.augment,
                                    self.device, self.drop_last)
        if self.shuffle:
            self.epoch += 1
        return batches

    def __len__(self) -> int:
        return self.data.num_batches(self.batch_size, self.drop_last)
