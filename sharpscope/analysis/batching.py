"""Shared plumbing of every analysis: the ``data`` convention and leaving the model as found.

Convention (DESIGN.md): ``data`` is one ``(inputs, targets)`` batch or any iterable of such batches
(a DataLoader). Analyses run in eval mode and leave parameters, buffers, ``.grad``,
``requires_grad`` and every module's train/eval flag exactly as they found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError

Batch = tuple[torch.Tensor, torch.Tensor]
#: ``loss_fn(outputs, targets)`` returning a mean-reduced scalar loss.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


#: Batch size used when an analysis is given a map-style ``Dataset`` instead of batches.
DATASET_BATCH_SIZE = 256


def as_batches(data: Any) -> list[Batch]:
    """Return ``data`` as a list of ``(inputs, targets)`` batches; raise :class:`UserInputError` (a ``ValueError``) if empty.

    A single batch is wrapped in a list; an iterable (DataLoader) is materialised once so that
    iterative algorithms see the same batches in every pass. A map-style ``Dataset`` (e.g. a
    ``TensorDataset``) yields single examples, not batches: it is batched here in its order, in batches
    of :data:`DATASET_BATCH_SIZE` (iterating it example by example was 25x slower).
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=DATASET_BATCH_SIZE, shuffle=False)
    if _is_single_batch(data):
        batches = [(data[0], data[1])]
    else:
        try:
            batches = [(b[0], b[1]) for b in data]
        except TypeError as exc:
            raise UserInputError(
                "data must be one (inputs, targets) batch or an iterable of such batches "
                f"(a DataLoader); got {type(data).__name__}"
            ) from exc
    if not batches or all(len(x) == 0 for x, _ in batches):
        raise UserInputError("data is empty: give at least one non-empty (inputs, targets) batch")
    return [(x, y) for x, y in batches if len(x) > 0]


def prepared_batches(model: nn.Module, loss_fn: LossFn, data: Any) -> list[Batch]:
    """``data`` as batches, after the two cheap checks every analysis runs before long work.

    Refuses non-finite weights (naming the tensors) and a model that cannot run on the data (one
    forward pass and the loss on two examples of the first batch), each as one :class:`UserInputError`.
    """
    from .evaluation import check_finite_parameters, check_model_accepts  # it imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
    batches = as_batches(data)
    check_finite_parameters(model)
    check_model_accepts(model, loss_fn, batches[0])
    return batches


def batch_weights(batches: Sequence[Batch]) -> list[float]:
    """Weight of each batch in the full-data mean: its size over the total number of samples."""
    sizes = [len(x) for x, _ in batches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


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
