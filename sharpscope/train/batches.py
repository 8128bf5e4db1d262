"""Training data given as batches: the general form of :func:`~sharpscope.train.fit`.

Besides a :class:`~sharpscope.data.TensorData` (which :func:`fit` shuffles, augments and cuts into
batches itself), ``fit`` takes any *re-iterable* of batches: a ``DataLoader``, a list of batches, a
map-style ``Dataset`` (batched here with ``config.batch_size``). A batch is an ``(inputs, targets)``
tuple, a dict of tensors or anything the ``loss_fn`` understands (:mod:`sharpscope.analysis.objective`).
Each epoch iterates the data once, in the order it yields; one batch is one optimizer step.

Reproducibility: before every epoch the loader's ``generator`` (when it has one; a ``Dataset`` given to
``fit`` gets one) is seeded from ``(seed, epoch)``, and a shuffling ``DataLoader`` without a generator
draws its order from torch's global generator, which ``fit`` seeds and its checkpoints store. Either
way ``resume`` reproduces the batch order of an uninterrupted run, as long as nothing else draws from
the global generator between epochs (e.g. a ``collate_fn`` or worker that does). Other iterables
(a sampler with a private generator, a stream) are replayed as they iterate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ..analysis.batching import Batch, batch_size, first_samples, map_tensors, to_device
from ..errors import UserInputError

_MIX = (1_000_003, 1_000_033)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the loader's generator in ``epoch`` (a fixed mix of the run's seed and the epoch)."""
    return ((int(seed) * _MIX[0] + int(epoch)) * _MIX[1] + 7) % (2**63)


def _as_batch(item: Any) -> Batch:
    """A yielded item as a batch: tuples/lists of tensors stay as they are, dicts become plain dicts."""
    return dict(item) if isinstance(item, Mapping) else item


class BatchData:
    """Training or test data as a re-iterable of batches (see the module docstring).

    Args:
        data: a ``DataLoader``, a list/tuple of batches, a map-style ``Dataset`` or any re-iterable
            with ``len()`` (the learning-rate schedule counts steps per epoch).
        what: the argument's name, for error messages.
        batch_size: the batch size used to batch a map-style ``Dataset``.
        shuffle: whether a ``Dataset`` batched here is shuffled (training data).
    """

    def __init__(self, data: Any, what: str = "train_data", batch_size: int = 128, shuffle: bool = True) -> None:
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
            data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                                               generator=torch.Generator() if shuffle else None)
        elif isinstance(data, Mapping) or (isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor)):
            raise UserInputError(f"{what} is one batch; give a list of batches or a DataLoader")
        if not isinstance(data, Iterable) or isinstance(data, Iterator):  # an iterator is exhausted after one epoch
            raise UserInputError(f"{what} must be re-iterable (a DataLoader, a list of batches or a TensorData); "
                                 f"got {type(data).__name__}, which can be iterated only once")
        try:
            self.steps = len(data)
        except TypeError:
            raise UserInputError(f"{what} ({type(data).__name__}) has no len(); fit needs the number of batches per "
                                 "epoch for the learning-rate schedule: give a DataLoader over a sized dataset or a "
                                 "list of batches") from None
        if self.steps == 0:
            raise UserInputError(f"{what} is empty: give at least one batch")
        self.data, self.what = data, what
        self.name = type(data).__name__

    def __len__(self) -> int:
        """Batches per epoch (optimizer steps per epoch for training data)."""
        return self.steps

    @property
    def num_examples(self) -> int | None:
        """Examples per epoch when cheap to tell (a DataLoader's sized dataset, a list of batches), else None."""
        dataset = getattr(self.data, "dataset", None)
        if dataset is not None:
            try:
                return len(dataset)
            except TypeError:
                return None
        if isinstance(self.data, (list, tuple)):
            return sum(batch_size(_as_batch(b)) for b in self.data)
        return None

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match: the container's type, its batches and examples per epoch."""
        return {"name": self.name, "batches": self.steps, "examples": self.num_examples}

    def _seed(self, seed: int, epoch: int) -> None:
        generator = getattr(self.data, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed(seed, epoch))

    def epoch(self, epoch: int, seed: int, device: torch.device) -> Iterator[Batch]:
        """The batches of ``epoch`` on ``device`` (the loader's generator seeded first)."""
        self._seed(seed, epoch)
        for item in self.data:
            yield to_device(_as_batch(item), device)

    def first(self, n: int | None, seed: int, device: torch.device) -> list[Batch]:
        """The first batches of epoch 0 holding ``n`` examples (the last one cut; None: one batch).

        Torch's global generator is left as it was, so taking them changes no later draw (the order of
        a shuffling loader, dropout): a run with tracking trains as one without.
        """
        out: list[Batch] = []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for batch in self.epoch(0, seed, device):
                out.append(batch)
                if n is None or sum(batch_size(b) for b in out) >= n:
                    break
        return out if n is None else first_samples(out, n)


def channels_last(batch: Batch) -> Batch:
    """``batch`` with its 4-D floating tensors (images) in channels-last memory format."""
    return map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 and t.is_floating_point() else t)

