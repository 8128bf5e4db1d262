"""Shared plumbing of every analysis: the ``data`` convention and leaving the model as found.

Convention (DESIGN.md): ``data`` is one batch or any iterable of batches (a DataLoader); a batch is an
``(inputs, targets)`` pair, a dict of tensors (``input_ids``, ``attention_mask``, ``labels``, ...) or
anything a ``loss_fn(model, batch)`` understands (:mod:`sharpscope.analysis.objective`). Analyses run in eval mode and leave parameters, buffers, ``.grad``,
``requires_grad`` and every module's train/eval flag exactly as they found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from .objective import as_objective, first_tensor

#: One batch: ``(inputs, targets)``, a dict of tensors, or anything a ``BatchLoss`` understands
#: (:mod:`sharpscope.analysis.objective`).
Batch = Any
#: ``loss_fn(outputs, targets)`` returning a mean-reduced scalar loss, or any objective
#: :func:`~sharpscope.analysis.objective.as_objective` accepts.
LossFn = Callable[..., torch.Tensor]


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, Mapping):
        return any(isinstance(v, torch.Tensor) for v in data.values())
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


#: Batch size used when an analysis is given a map-style ``Dataset`` instead of batches.
DATASET_BATCH_SIZE = 256


def _one_batch(batch: Any) -> Batch:
    """A batch as analyses keep it: ``(x, y)`` from a tuple/list of tensors (extra fields dropped), a
    dict from a mapping, anything else unchanged."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        return (batch[0], batch[1])
    if isinstance(batch, (tuple, list, torch.Tensor)) or first_tensor(batch) is not None:
        return batch
    raise TypeError(type(batch).__name__)


def as_batches(data: Any) -> list[Batch]:
    """Return ``data`` as a list of batches; raise :class:`UserInputError` (a ``ValueError``) if empty.

    A single batch (an ``(inputs, targets)`` pair or a dict of tensors) is wrapped in a list; an
    iterable (DataLoader) is materialised once so that iterative algorithms see the same batches in
    every pass. A map-style ``Dataset`` (e.g. a ``TensorDataset``) yields single examples, not batches:
    it is batched here in its order, in batches of :data:`DATASET_BATCH_SIZE` (iterating it example by
    example was 25x slower).
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=DATASET_BATCH_SIZE, shuffle=False)
    if _is_single_batch(data):
        batches = [_one_batch(data)]
    else:
        try:
            batches = [_one_batch(b) for b in data]
        except TypeError as exc:
            raise UserInputError(
                "data must be one batch ((inputs, targets) or a dict of tensors) or an iterable of such "
                f"batches (a DataLoader); got {type(data).__name__}"
            ) from exc
    kept = [b for b in batches if batch_size(b) > 0]
    if not kept:
        raise UserInputError("data is empty: give at least one non-empty batch")
    return kept


def prepared_batches(model: nn.Module, loss_fn: Any, data: Any) -> list[Batch]:
    """``data`` as batches, after the two cheap checks every analysis runs before long work.

    Refuses non-finite weights (naming the tensors) and a model that cannot run on the data (one
    forward pass and the loss on two examples of the first batch), each as one :class:`UserInputError`.
    """
    from .evaluation import check_finite_parameters, check_model_accepts  # it imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    objective = as_objective(loss_fn, model)
    batches = as_batches(data)
    check_finite_parameters(model)
    check_model_accepts(model, objective, batches[0])
    return batches


def batch_size(batch: Batch) -> int:
    """The leading size of the batch's first tensor (0 when it has none)."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return 0
    return int(tensor.shape[0])


def batch_weights(batches: Sequence[Batch], objective: Any = None) -> list[float]:
    """Weight of each batch in the full-data mean: its number of targets over the total.

    ``objective`` (anything :func:`~sharpscope.analysis.objective.as_objective` takes) counts the
    targets; by default, and for ``(x, y)`` classification, the number of examples.
    """
    counter = as_objective(objective).count if objective is not None else batch_size
    sizes = [counter(b) for b in batches]
    total = float(sum(sizes))
    if total <= 0:
        raise UserInputError("the data has no targets to average the loss over (every label is ignore_index?)")
    return [s / total for s in sizes]


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """``batch`` with ``fn`` applied to every tensor in it (tuples, lists and dicts, nested)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def slice_batch(batch: Batch, index: Any) -> Batch:
    """``batch`` restricted to the examples ``index`` selects (a slice or an index tensor).

    Applied to every tensor whose leading size is the batch size; other tensors are kept whole.
    """
    n = batch_size(batch)
    return map_tensors(batch, lambda t: t[index] if t.dim() > 0 and t.shape[0] == n else t)


def first_samples(batches: Sequence[Batch], n: int | None) -> list[Batch]:
    """The first ``n`` examples of ``batches`` (all of them for ``None``), in order."""
    if n is None:
        return list(batches)
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        size = batch_size(batch)
        out.append(batch if size <= left else slice_batch(batch, slice(0, left)))
        left -= min(size, left)
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """``batch`` with every tensor on ``device`` (floating tensors cast to ``dtype`` when given)."""
    if dtype is None:
        return map_tensors(batch, lambda t: t.to(device, non_blocking=True))
    return map_tensors(batch, lambda t: t.to(device, dtype=dtype, non_blocking=True) if t.is_floating_point()
                       else t.to(device, non_blocking=True))


def checked_loss(loss: torch.Tensor, where: str = "loss_fn") -> torch.Tensor:
    """Raise a clear error for a non-scalar loss (finite-ness is checked where it is read)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserInputError(
            f"{where} must return a scalar (mean-reduced) loss; got shape {shape}. "
            "Use reduction='mean'."
        )
    return loss


def require_finite(value: float, what: str) -> float:
    """Raise ``FloatingPointError`` instead of letting a NaN/inf escape silently."""
    if not torch.isfinite(torch.as_tensor(value)).item():
        raise FloatingPointError(f"{what} is not finite ({value}); check the model, data and loss_fn")
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode for the block; each one's own train flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval (or train) mode and restore it bit for bit afterwards.

    Saved and restored: every parameter's data, ``.grad`` and ``requires_grad``, every buffer, and
    every submodule's ``training`` flag.
    """
    params = list(model.parameters())
    saved_data = [p.detach().clone() for p in params]
    saved_grad = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_requires = [p.requires_grad for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, data, grad, req in zip(params, saved_data, saved_grad, saved_requires):
                p.copy_(data)
                p.grad = grad
                p.requires_grad_(req)
            for b, data in zip(buffers, saved_buffers):
                b.copy_(data)
        for module, flag in saved_flags:
            module.training = flag


def trainable_named_parameters(model: nn.Module,
                               params: Iterable[torch.Tensor] | None = None) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs that require grad, optionally restricted to ``params``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = {id(p) for p in params}
    chosen = [(n, p) for n, p in named if id(p) in wanted]
    if not chosen:
        raise UserInputError("params selects no trainable parameter of the model")
    return chosen
