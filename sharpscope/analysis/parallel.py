"""Data- and probe-parallel plumbing of the analyses over ``torch.distributed`` (ranks from :mod:`sharpscope.distributed`).

Every analysis takes ``distributed: bool | None``: ``None`` (the default) splits the work when a process
group with more than one rank is initialised (``torchrun``), ``True`` requires one, ``False`` never
splits. Every rank must call the analysis with the same arguments and the same ``data``; every rank
ends with the same result (rank 0 writes it).

Data split (:func:`shared_batches`): the batches are dealt round-robin, batch ``b`` to rank
``b mod N``; when there are fewer batches than ranks each batch is first cut into ``N`` pieces
(``torch.tensor_split``; the loss is a mean over targets and the model runs in eval mode, so the
weighted sum is unchanged). Each piece keeps its *global* weight ``c_b / C`` (its number of targets
over those of all ranks), so a rank's weighted sum plus one all-reduce (``sum over ranks``) is exactly the full-data
mean: ``L = sum_r sum_{b in r} (n_b / n) L_b``, and likewise its gradient and Hessian-vector product.

Per-batch analyses (Z-scores, mask statistics) deal whole batches (:func:`my_indices`), compute each
batch's statistics on its owner and gather them in batch order (:func:`gather_in_order`): the result is
the single-process one bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from .. import distributed as dist
from ..errors import UserInputError
from .batching import Batch, batch_size, batch_weights, slice_batch

T = TypeVar("T")
Weighted = tuple[Batch, float]


def use_ranks(distributed: bool | None) -> bool:
    """Whether to split the work over ranks (see the module docstring for ``None``/``True``/``False``)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise UserInputError(f"distributed must be True, False or None (automatic), got {distributed!r}")
    if distributed and not dist.is_initialized():
        raise UserInputError("distributed=True needs an initialised torch.distributed process group "
                             "(run under torchrun, or call sharpscope.distributed.init_from_env())")
    return distributed is not False and dist.is_distributed()


def main_progress(progress: bool) -> bool:
    """Whether to draw a progress bar: only when asked, and on rank 0 alone."""
    return bool(progress) and dist.is_main()


def rank_and_world(active: bool) -> tuple[int, int]:
    """``(rank, world size)`` when splitting, ``(0, 1)`` otherwise."""
    return (dist.rank(), dist.world_size()) if active else (0, 1)


def my_indices(n: int, active: bool) -> list[int]:
    """The items ``0..n-1`` this rank owns: ``rank, rank + N, ...`` (all of them when not splitting)."""
    r, world = rank_and_world(active)
    return list(range(r, n, world))


def _pieces(batches: Sequence[Batch], world: int) -> list[Batch]:
    if len(batches) >= world:
        return list(batches)
    out: list[Batch] = []
    for batch in batches:
        for index in torch.tensor_split(torch.arange(batch_size(batch)), world):
            if len(index) > 0:
                out.append(slice_batch(batch, slice(int(index[0]), int(index[-1]) + 1)))
    return out


def shared_batches(batches: Sequence[Batch], active: bool, objective: Any = None) -> list[Weighted]:
    """This rank's ``(batch, global weight)`` pairs (all batches with ``c_b / C`` when not splitting).

    ``c_b`` is the batch's number of targets as ``objective`` counts them (examples by default).
    """
    _, world = rank_and_world(active)
    pieces = _pieces(batches, world) if active else list(batches)
    weighted = list(zip(pieces, batch_weights(pieces, objective)))
    return [weighted[i] for i in my_indices(len(weighted), active)]


def reduce_sum(tensors: Sequence[torch.Tensor], active: bool) -> list[torch.Tensor]:
    """In-place sum over ranks with one all-reduce (a gloo group reduces CUDA tensors through the host)."""
    tensors = list(tensors)
    if not active or not tensors:
        return tensors
    if dist.backend() == "gloo" and tensors[0].device.type != "cpu":
        host = [t.detach().cpu() for t in tensors]
        dist.all_reduce_sum_list(host)
        for t, h in zip(tensors, host):
            t.copy_(h)
        return tensors
    return dist.all_reduce_sum_list(tensors)


def gather_in_order(mine: dict[int, T] | BaseException, n: int, active: bool) -> list[T]:
    """Items ``0..n-1`` computed by their owners (``mine``: index -> item on this rank), in order, on every rank.

    ``mine`` may be the exception this rank's share raised: it is then raised on every rank (the lowest
    failing rank's), so one bad batch stops all ranks with the same error instead of leaving the others
    waiting in a collective.
    """
    parts = dist.all_gather_object(mine) if active else [mine]
    for part in parts:
        if isinstance(part, BaseException):
            raise part
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)  # type: ignore[call-overload]
    return [merged[i] for i in range(n)]


def sum_int(value: int, active: bool) -> int:
    """An integer summed over ranks (e.g. Hessian-vector products done by every rank)."""
    return int(round(dist.sum_scalar(float(value)))) if active else int(value)
