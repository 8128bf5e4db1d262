"""The one place that knows ``torch.distributed``.

Everything else in sharpscope asks this module who it is (:func:`rank`, :func:`world_size`,
:func:`is_main`), reduces through it (:func:`all_reduce_sum`, :func:`weighted_mean`) and shards data
with it (:func:`shard_indices`). Without an initialised process group every function is the
single-process identity (rank 0 of 1), so library code calls them unconditionally.

The engine is plain ``torch.distributed`` started by ``torchrun``: NCCL on GPUs, gloo on CPU.
:func:`init_from_env` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and does nothing when it is absent.

Sharding (:func:`shard_indices`) has ``DistributedSampler`` semantics: rank ``r`` of ``N`` takes the
strided slice ``indices[r::N]`` of the (shared, seeded) epoch permutation. An uneven tail
(``n mod N != 0``) is handled by ``uneven``:

* ``"pad"`` (training default, like ``DistributedSampler(drop_last=False)``): the permutation is
  extended by its own first ``N - n mod N`` entries so every rank holds ``ceil(n/N)`` indices; those
  few examples are seen twice in that epoch;
* ``"drop"`` (``drop_last=True``): the last ``n mod N`` entries are dropped, every rank holds
  ``floor(n/N)``;
* ``"keep"`` (analyses): no padding and no dropping, ranks ``< n mod N`` hold one index more; the
  shards are exactly a partition of ``indices``, so batch-size-weighted reductions are exact.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import UserInputError

DEFAULT_TIMEOUT_S = 300.0
UNEVEN_CHOICES = ("pad", "drop", "keep")


class DistributedFailure(RuntimeError):
    """A peer process died or a collective timed out; the message is one line for the user."""


# --------------------------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    """Whether a default process group exists (False when torch.distributed is unavailable)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on the one process that prints and writes files (rank 0)."""
    return rank() == 0


def is_distributed() -> bool:
    """True when more than one process takes part."""
    return world_size() > 1


def backend() -> str | None:
    """The default group's backend name (``"gloo"``, ``"nccl"``) or None without a group."""
    return str(dist.get_backend()) if is_initialized() else None


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def device_for_rank() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- set-up


def init_from_env(backend_name: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes in the environment; return whether one is active.

    Does nothing (returns False) without torchrun's variables, and nothing more when the group is
    already initialised. ``backend_name`` defaults to NCCL with CUDA, gloo otherwise. ``timeout_s``
    bounds every collective: a rank whose peer died stops after at most that long.
    """
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise UserInputError("torch.distributed is not available in this PyTorch build; run one process")
    name = backend_name or ("nccl" if torch.cuda.is_available() else "gloo")
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=name, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return True


def init_process_group(
    rank_: int, world_size_: int, init_method: str, backend_name: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Explicit initialisation (tests, notebooks): ``init_method`` is e.g. ``tcp://127.0.0.1:PORT``."""
    dist.init_process_group(
        backend=backend_name, init_method=init_method, rank=rank_, world_size=world_size_,
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )


def destroy() -> None:
    """Leave the process group if one is active."""
    if is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0); for tests and local rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------- collectives


def barrier(timeout_s: float | None = None) -> None:
    """Wait for every rank; raise :class:`DistributedFailure` (one line) if one does not arrive.

    With gloo this is ``monitored_barrier`` bounded by ``timeout_s`` (default: the group timeout);
    with NCCL a plain barrier bounded by the group timeout.
    """
    if not is_distributed():
        return
    try:
        if backend() == "gloo":
            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
            dist.monitored_barrier(**kwargs)
        else:
            dist.barrier()
    except RuntimeError as error:
        raise DistributedFailure(failure_line("barrier", error)) from error


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``tensor`` over ranks; returns it (identity in one process)."""
    if is_distributed():
        _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_list(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """In-place sum over ranks of several tensors with ONE all-reduce (flattened into one buffer)."""
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum of ``tensor`` over ranks; returns it."""
    if is_distributed():
        _collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
    return tensor


def weighted_mean(tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """Batch-size-weighted mean over ranks, in place: ``x <- sum_r w_r x_r / sum_r w_r``.

    ``tensor`` holds this rank's mean over its ``weight`` examples; the result is the mean over all
    examples of all ranks. One all-reduce of ``numel + 1`` numbers.
    """
    return weighted_mean_list([tensor], weight)[0]


def weighted_mean_list(tensors: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """:func:`weighted_mean` of several tensors with one all-reduce (weight appended to the buffer)."""
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    dtype = torch.promote_types(tensors[0].dtype, torch.float64) if tensors[0].is_floating_point() \
        else torch.float64
    flat = torch.cat([t.detach().reshape(-1).to(dtype) * weight for t in tensors]
                     + [torch.tensor([float(weight)], dtype=dtype, device=tensors[0].device)])
    _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    total = flat[-1]
    if float(total) <= 0.0:
        raise DistributedFailure("weighted_mean over ranks: the total weight is zero (no rank had data)")
    offset = 0
    for t in tensors:
        t.copy_((flat[offset:offset + t.numel()] / total).view_as(t).to(t.dtype))
        offset += t.numel()
    return tensors


def sum_scalar(value: float) -> float:
    """Sum of a Python number over ranks (float64)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    all_reduce_sum(t)
    return float(t.item())


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank receives rank ``src``'s ``tensor``; returns it."""
    if is_distributed():
        _collective(dist.broadcast, tensor, src=src)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    _collective(dist.broadcast_object_list, box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            broadcast(tensor.data, src)


# --------------------------------------------------------------------------------------------- sharding


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shared permutation of ``range(n)`` for ``epoch``: the same on every rank, and the order in which
    one process's :meth:`sharpscope.data.TensorData.batches` visits the data (generator of ``(seed, epoch)``)."""
    from .data.dataset import epoch_generator  # the one definition of the epoch stream

    return torch.randperm(int(n), generator=epoch_generator(seed, epoch))


def shard_indices(
    indices: torch.Tensor | Sequence[int], rank_: int | None = None, world_size_: int | None = None,
    uneven: str = "pad",
) -> torch.Tensor:
    """This rank's disjoint strided shard ``indices[r::N]`` (see the module docstring for ``uneven``).

    The shards of all ranks, interleaved, give back ``indices`` (after padding/dropping), so the
    concatenation of every rank's k-th batch of size ``B/N`` is the single process's k-th batch of
    size ``B`` (as a set).
    """
    if uneven not in UNEVEN_CHOICES:
        raise UserInputError(f"uneven must be one of {', '.join(UNEVEN_CHOICES)}; got {uneven!r}")
    indices = torch.as_tensor(indices, dtype=torch.long)
    r = rank() if rank_ is None else int(rank_)
    size = world_size() if world_size_ is None else int(world_size_)
    if size <= 1:
        return indices
    n = indices.numel()
    if uneven == "pad" and n % size:
        pad = size - n % size
        repeats = -(-pad // max(n, 1))
        indices = torch.cat([indices, indices.repeat(repeats)[:pad]]) if n else indices
    elif uneven == "drop":
        indices = indices[: n - n % size]
    return indices[r::size]


def shard_sizes(n: int, world_size_: int | None = None, uneven: str = "pad") -> list[int]:
    """How many indices each rank holds after :func:`shard_indices` of ``n`` indices."""
    size = world_size() if world_size_ is None else int(world_size_)
    return [int(shard_indices(torch.arange(n), r, size, uneven).numel()) for r in range(size)]


# --------------------------------------------------------------------------------------------- internals


def _collective_device() -> torch.device:
    return device_for_rank() if backend() == "nccl" else torch.device("cpu")


def _collective(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - thin wrapper around dist.* calls
    """Run one collective; turn a dead peer / timeout into :class:`DistributedFailure` (one line)."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:
        if isinstance(error, DistributedFailure):
            raise
        raise DistributedFailure(failure_line(getattr(fn, "__name__", "collective"), error)) from error


_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed out|timeout|process ?group|"
                                 r"broken pipe|remote worker|watchdog", re.IGNORECASE)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a failed collective (dead peer, timeout), not from the computation."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(error)))


def failure_line(what: str, error: BaseException) -> str:
    """The one line a rank prints when the collective ``what`` failed with ``error``."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo prefixes the C++ source location
    return (f"rank {rank()}: distributed {what} failed (a peer process died or timed out): {first[:200]}; "
            "fix the failed rank and rerun with --resume")
