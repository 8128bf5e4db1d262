"""Full-data evaluation pieces every analysis shares, written once.

- :func:`full_data_loss`: the mean loss over all batches, each weighted by its share of the examples,
  ``L(w) = sum_b (c_b / C) * loss_b(w)`` with ``c_b`` the number of targets of batch ``b`` (examples
  for a classifier, target tokens for a language model; :mod:`sharpscope.analysis.objective`), optionally with the accuracy and with some parameters replaced.
- :func:`full_data_gradient`: ``grad L(w)`` with the same weighting, without touching ``.grad``.
- :func:`assign_parameters` / :func:`offset_parameters`: the weight setters (``w <- v``;
  ``w <- w0 + sum_i c_i d_i``).
- :func:`global_norm`: ``sqrt(sum_t ||t||^2)`` in float64.
- :func:`non_finite_tensors`, :func:`check_finite_parameters` and :func:`check_model_accepts`: the cheap
  checks every analysis runs before long work (non-finite weights; a model that cannot run on the data).

``distributed=True`` (the helpers default to ``False``: training calls them on one rank) evaluates this
rank's share of the batches with their global weights and sums over ranks with one all-reduce
(:mod:`sharpscope.analysis.parallel`); every rank then holds the full-data value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from .batching import Batch, checked_loss, eval_mode, model_device, slice_batch, to_device
from .objective import as_objective, functional_model
from .parallel import reduce_sum, shared_batches, use_ranks


@dataclass(frozen=True)
class LossAndAccuracy:
    """Mean loss and accuracy (argmax of the outputs against integer targets) over all batches."""

    loss: float
    accuracy: float


def _forward(model: nn.Module, parameters: Mapping[str, torch.Tensor] | None) -> Callable[..., Any]:
    return model if parameters is None else functional_model(model, parameters)


@torch.no_grad()
def weighted_loss_sums(model: nn.Module, loss_fn: Any, weighted: Sequence[tuple[Batch, float]], *,
                       parameters: Mapping[str, torch.Tensor] | None = None, with_accuracy: bool = False,
                       context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                       ) -> torch.Tensor:
    """``[sum_b w_b loss_b, correct predictions]`` over ``(batch, weight)`` pairs, float64 on the model's device.

    The building block of :func:`full_data_loss` (and of a data-split landscape): no host synchronisation.
    """
    objective = as_objective(loss_fn, model)
    device = model_device(model)
    forward = _forward(model, parameters)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, weight in weighted:
        batch = to_device(batch, device)
        with (context() if context is not None else contextlib.nullcontext()):
            out = objective.outputs(forward, batch)
            loss = checked_loss(objective.loss(out, batch))
        sums[0] += loss.double() * weight
        if with_accuracy:
            correct = objective.correct(out, batch)
            if correct is not None:
                sums[1] += correct
    return sums


@torch.no_grad()
def full_data_loss(model: nn.Module, loss_fn: Any, batches: Sequence[Batch], *,
                   parameters: Mapping[str, torch.Tensor] | None = None, with_accuracy: bool = False,
                   context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                   distributed: bool = False) -> float | LossAndAccuracy:
    """Mean of the loss over all ``batches`` (each weighted by its number of targets), in the model's current mode.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` or any objective
            :func:`~sharpscope.analysis.objective.as_objective` accepts.
        parameters: name -> tensor replacing those parameters/buffers for the evaluation
            (``torch.func.functional_call``; the model itself is not written to).
        with_accuracy: also count ``argmax(outputs) == targets`` (return a :class:`LossAndAccuracy`;
            the accuracy is over the objective's targets, e.g. tokens for a language model).
        context: a factory of a context entered around each forward pass (e.g. autocast).
        distributed: data-parallel over the ranks of ``torch.distributed`` (module docstring).

    The value may be non-finite; callers decide whether that is an error (an analysis at ``w``) or
    a result (a landscape point far from ``w``). Accumulation is in float64 on the model's device,
    with one host synchronisation at the end.
    """
    objective = as_objective(loss_fn, model)
    active = use_ranks(distributed) if distributed else False
    sums = weighted_loss_sums(model, objective, shared_batches(batches, active, objective), parameters=parameters,
                              with_accuracy=with_accuracy, context=context)
    total, correct = reduce_sum([sums], active)[0].tolist()
    if not with_accuracy:
        return float(total)
    n = sum(objective.count(b) for b in batches)
    return LossAndAccuracy(float(total), float(correct) / max(n, 1))


def full_data_gradient(model: nn.Module, loss_fn: Any, batches: Sequence[Batch],
                       params: Sequence[torch.Tensor], distributed: bool = False) -> tuple[float, list[torch.Tensor]]:
    """``(L(w), grad L(w))`` over all batches for ``params`` (zeros where a tensor gets no gradient).

    Gradients come from ``torch.autograd.grad``, so ``.grad`` of every parameter is left alone. With
    ``distributed`` the loss and the gradient are summed over ranks in one all-reduce.
    """
    objective = as_objective(loss_fn, model)
    device = model_device(model)
    active = use_ranks(distributed) if distributed else False
    grads = [torch.zeros_like(p) for p in params]
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for batch, weight in shared_batches(batches, active, objective):
        loss = checked_loss(objective(model, to_device(batch, device)))
        g = torch.autograd.grad(loss * weight, list(params), allow_unused=True)
        torch._foreach_add_(grads, [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
        total += loss.detach().double() * weight
    reduce_sum([total, *grads], active)  # one all-reduce (in float64 when the model is float32)
    return float(total), grads


@torch.no_grad()
def assign_parameters(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """``w <- v`` for each pair, in place."""
    torch._foreach_copy_(list(params), list(values))


@torch.no_grad()
def offset_parameters(params: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
                      directions: Sequence[Sequence[torch.Tensor]], coefficients: Sequence[float]) -> None:
    """``w <- w0 + sum_i c_i d_i`` in place (``directions[i]`` is one tensor per parameter)."""
    params = list(params)
    torch._foreach_copy_(params, list(base))
    for direction, c in zip(directions, coefficients):
        if c != 0.0:
            torch._foreach_add_(params, list(direction), alpha=float(c))


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """``sqrt(sum_t ||t||_2^2)`` computed in float64 (0.0 for no tensors)."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([t.detach().double().norm() for t in tensors])))


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and floating buffers holding NaN or inf (one synchronisation per device)."""
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if torch.is_floating_point(t)]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(named)
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in indices]).tolist()
        for i, ok in zip(indices, flags):
            finite[i] = ok
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite_parameters(model: nn.Module, what: str = "model") -> None:
    """Refuse a model with NaN/inf in any parameter or floating buffer, naming the tensors."""
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserInputError(f"the {what} has non-finite values (NaN or inf) in {shown}; "
                             "analyse a checkpoint from before the run diverged")


def _shapes(batch: Batch) -> str:
    """Per-example shapes of the batch's tensors, for error messages."""
    if isinstance(batch, Mapping):
        return ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return f"inputs of shape {tuple(batch[0].shape[1:])} per example, targets {tuple(batch[1].shape[1:]) or 'scalar'}"
    return type(batch).__name__


def check_model_accepts(model: nn.Module, loss_fn: Any, batch: Batch, n: int = 2) -> None:
    """Run one forward pass and the loss on the first ``n`` examples of ``batch`` before long work.

    A model that cannot run on the data (wrong input size, channel count, image too small for its
    pooling) becomes one :class:`UserInputError` naming the input shapes and the model's complaint.
    """
    objective = as_objective(loss_fn, model)
    small = to_device(slice_batch(batch, slice(0, n)), model_device(model))
    try:
        with torch.no_grad(), eval_mode(model):
            checked_loss(objective(model, small))
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError) as exc:
        if isinstance(exc, UserInputError):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"the {type(model).__name__} model cannot run on this data ({_shapes(batch)}): "
            f"{detail[:300]}; check that the model was built for this dataset (input size, channels, classes)"
        ) from None
