"""The Hessian of the full-data loss as a linear operator: Hessian-vector products (HVPs).

For parameters ``w`` (the trainable tensors, flattened and concatenated into one vector of length
``dim``) and data split into batches ``B_1 .. B_m`` with ``n_1 .. n_m`` targets (``N = sum n_b``;
examples for a classifier, target tokens for a language model -- :mod:`sharpscope.analysis.objective`),
the operator applies

    H v = sum_b (n_b / N) * d^2 L_b(w) / dw^2 . v,

where ``L_b`` is the mean loss of batch ``b``. Weighting by the number of targets makes unequal
batches (or padding) give exactly the Hessian of the mean loss over all targets of the concatenated
data. Attention runs on the math kernel during every product (:mod:`sharpscope.analysis.attention`:
the fused kernels have no double backward). The model runs in eval mode
(BatchNorm uses its running statistics, dropout is off), so ``H`` is the Hessian of a deterministic
function of ``w`` -- the quantity PyHessian and Ghorbani et al. (2019) report.

Every algorithm in :mod:`sharpscope.analysis.hessian` is written against this one operator
(the curvlinops idea: one operator, many algorithms).

How an HVP is computed (``hvp=``), with its cost in gradients (``time(HVP) / time(gradient)``,
measured on 1 CPU thread, median of alternating runs; ResNet-20 on 32 and 128 CIFAR images, the
paper's ViT on 16 images, a 4-layer GPT-2 on 4 x 64 tokens):

* ``"cached"`` (2.0 ResNet-20, 1.9-2.1 ViT, 1.7 GPT-2): reverse-over-reverse on a gradient graph built
  once (``create_graph=True``) and kept; every HVP is then ONE backward pass through that graph (the
  first also builds it: about 1.4 gradients). Cheapest per product, but it holds the graph of every
  batch in memory, so ``"auto"`` uses it only for a single batch.
* ``"autograd"`` (2.5-3.2 ResNet-20, 3.0 ViT, 2.6 GPT-2): reverse-over-reverse, the gradient graph of
  each batch rebuilt per product and freed after its backward pass (the lowest peak memory: the graph
  is released while it is back-propagated).
* ``"func"`` (4.2-4.6 ResNet-20, 3.2 ViT, 3.9 GPT-2): forward-over-reverse, ``jvp(grad(L), (w,), (v,))``
  with :func:`torch.func.functional_call` (Pearlmutter 1994; the torch.func recipe). One forward and
  one backward with dual numbers per batch, nothing kept between calls; about twice the peak memory of
  ``"autograd"`` (every activation carries its tangent), and on CPU the slowest.

Choice (``hvp="auto"``), made once when the operator is built and never changed afterwards: one batch
(on this rank) -> ``"cached"``, without a trial. Several batches -> a timed trial product on the first
batch with ``"autograd"`` and with ``"func"`` (after an untimed ``"func"`` product that checks that
torch.func supports the model and warms it up); the faster is kept and the times are in
``trial_seconds``. If torch.func reports the model as unsupported (a ``RuntimeError`` or
``NotImplementedError``, e.g. a missing forward-mode derivative) and double-backward autograd computes
the same trial product, ``"autograd"`` is used and the reason kept in ``fallback_reason`` (with a
``RuntimeWarning`` when ``"func"`` was asked for explicitly: ``hvp="func"`` is checked, not timed). An
error that autograd raises as well is the model's or the data's, and propagates. An explicit
``"cached"`` or ``"autograd"`` is taken as given. Data-parallel ranks time their own trial (no
collective), so with unequal shares they may pick different methods; the products are the same.

:meth:`HessianOperator.matmat` applies the operator to ``k`` vectors at once: with several batches the
gradient graph of each batch is then built once per block instead of once per vector (also when
``"auto"`` chose ``"func"``: see :meth:`~HessianOperator.matmat`). Vectorising the
``k`` backward passes (``torch.func.vmap`` / ``is_grads_batched=True``) was measured slower than a loop
on CPU (ResNet-20: 2.5-2.7 against 2.9-3.2 HVP/s; ViT: 1.3-1.5 against 1.4-1.7) and is not used.

Models with BatchNorm: with running statistics (eval mode) ``BN(x)`` is the affine map
``x * gamma / sqrt(var + eps) + (beta - mu gamma / sqrt(var + eps))``, and it is computed as such inside
the operator (:class:`_AffineEvalBatchNorm`): PyTorch's double backward of ``native_batch_norm`` uses
its general training-mode formula, about 15 % of an HVP on ResNet-20; the affine form saves most of it.

Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) was measured and is not
offered: it does support double backward, but reverse-over-reverse recomputes each block inside the
first backward with ``create_graph=True``, so the recomputed activations join the gradient graph and the
peak does not drop (ViT, 16 images: 684 -> 677 MiB with ``"autograd"``, 802 -> 892 MiB with
``"cached"``); with ``"func"`` it halves the peak (1306 -> 691 MiB), which only reaches what
``"autograd"`` needs without it. For a model too large for one HVP, use smaller batches (the weighting
over batches is exact) and ``hvp="autograd"``.

The operator works on a snapshot of the parameters and buffers taken at construction (cast to
``dtype`` if given, e.g. ``torch.float64`` for validation), so the model itself is never written to:
its parameters, buffers, ``.grad`` and ``requires_grad`` stay bit-for-bit as they were. Only the
modules' train/eval flags are switched for the duration of each HVP and restored afterwards.
Used as a context manager, the whole block additionally runs under
:func:`~sharpscope.analysis.batching.preserved_model_state`.

Data-parallel (``distributed``, see :mod:`sharpscope.analysis.parallel`): each rank applies the
weighted sum above to its share of the batches (with the global weights ``n_b / N``) and the ranks
add their partial products with ONE all-reduce of ``dim + 1`` numbers per HVP (the product and a
count of non-finite batch losses), so every rank holds the same ``H v``. One HVP then costs
``compute / N + all-reduce(dim)``: a ring all-reduce moves about ``2 (N - 1) / N * dim`` numbers
per rank, independent of the data size, so it scales while the per-rank compute (``n / N``
examples, forward + double backward) dominates the transfer of the parameter vector. Nothing is
copied to the host per batch: the loss of each batch is checked for finiteness with the product,
one host synchronisation per HVP.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import grad, jvp
from torch.overrides import TorchFunctionMode

from .._validate import choice
from ..errors import UserInputError
from .attention import math_attention
from .batching import (
    Batch,
    LossFn,
    as_batches,
    batch_weights,
    checked_loss,
    eval_mode,
    model_device,
    preserved_model_state,
    to_device,
    trainable_named_parameters,
)
from .evaluation import check_finite_parameters
from .objective import as_objective, functional_model
from .parallel import main_progress, reduce_sum, shared_batches, use_ranks

HVP_METHODS = ("auto", "func", "cached", "autograd")

# What torch.func raises for a model it cannot transform (missing forward-mode derivative, an
# autograd.Function without setup_context, an unsupported operator). Only these trigger the fallback,
# and only if double-backward autograd then succeeds on the same trial product.
_UNSUPPORTED = (RuntimeError, NotImplementedError)


def _add_weighted(total: list[torch.Tensor] | None, terms: Sequence[torch.Tensor],
                  weight: float) -> list[torch.Tensor]:
    """``total + weight * terms`` tensor by tensor (``weight * terms`` when ``total`` is None).

    ``total`` is updated in place (one fused ``_foreach`` kernel) and returned; ``terms`` must be fresh
    tensors (they become ``total`` when it is None and ``weight`` is 1).
    """
    terms = list(terms)
    if total is None:
        return terms if weight == 1.0 else torch._foreach_mul(terms, weight)
    torch._foreach_add_(total, terms, alpha=weight)
    return total


class _AffineEvalBatchNorm(TorchFunctionMode):
    """BatchNorm with running statistics computed as the affine map it is: ``x * s + t`` per channel.

    In eval mode ``BN(x) = (x - mu) / sqrt(var + eps) * gamma + beta`` with fixed ``mu, var``; PyTorch's
    double backward of ``native_batch_norm`` uses the general (training-mode) formula, which on
    ResNet-20 takes about 15 % of a Hessian-vector product. ``s = gamma / sqrt(var + eps)`` and
    ``t = beta - mu s`` give the same function of ``(x, gamma, beta)`` with two elementwise operations.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            given = {**dict(zip(names, args)), **kwargs}
            if not given.get("training", False) and given.get("running_mean") is not None:
                return _affine_batch_norm(given)
        return func(*args, **kwargs)


def _affine_batch_norm(given: dict[str, Any]) -> torch.Tensor:
    x, mean, var = given["input"], given["running_mean"], given["running_var"]
    weight, bias = given.get("weight"), given.get("bias")
    scale = torch.rsqrt(var + given.get("eps", 1e-5))
    scale = scale if weight is None else weight * scale
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_Weighted = tuple[Batch, float]


def _check_arguments(model: Any, loss_fn: Any, hvp: Any, dtype: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    as_objective(loss_fn, model)
    choice(hvp, "hvp", HVP_METHODS)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserInputError(f"dtype must be a floating torch dtype (e.g. torch.float64) or None, got {dtype!r}")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(dtype)
    return t


class HessianOperator:
    """Hessian of the full-data mean loss w.r.t. the trainable parameters, as a linear operator.

    Args:
        model: any ``nn.Module``; parameters with ``requires_grad=False`` are held fixed (excluded).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar, mean-reduced loss, or any objective
            :func:`~sharpscope.analysis.objective.as_objective` takes (``"lm"``, ``"hf"``,
            ``loss_fn(model, batch)``, an :class:`~sharpscope.analysis.objective.Objective`).
        data: one batch (``(inputs, targets)`` or a dict of tensors) or an iterable of them (a
            DataLoader); materialised once.
        params: restrict to these parameter tensors (e.g. one layer for a block of the Hessian).
        dtype: compute in this floating dtype (``torch.float64`` for validation); default: the model's.
        hvp: ``"auto"`` (``"cached"`` for a single batch, else the faster of ``"func"`` and
            ``"autograd"`` in a timed trial), ``"func"``, ``"cached"`` or ``"autograd"`` -- see the module
            docstring.
        progress: show a progress bar over batches inside each HVP (useful for large DataLoaders).
        distributed: split the batches over the ranks of ``torch.distributed`` and all-reduce every
            product (``None``: when a process group with several ranks is initialised; every rank
            must build the operator with the same arguments and call ``matvec`` the same number of times).

    Raises ``UserInputError`` for non-finite weights (naming the tensors), bad arguments or empty data.

    Attributes:
        dim: number of scalar parameters (the side of the Hessian).
        n_hvp: number of full-data Hessian-vector products computed so far.
        param_names, shapes: the parameter tensors in the order of the flat vector.
        device, dtype: where and in which precision vectors live.
        method: the product method in use (``"func"``, ``"cached"`` or ``"autograd"``), fixed at construction.
        fallback_reason: why ``"func"`` could not be used (None if it was not wanted or worked).
        trial_seconds: the timed trial products behind an ``"auto"`` choice (``{}`` when none ran).

    Example::

        with HessianOperator(model, loss_fn, loader) as op:
            hv = op.matvec(torch.randn(op.dim, device=op.device, dtype=op.dtype))
    """

    #: The matrix this operator applies (:data:`sharpscope.analysis.hessian.CURVATURES`).
    curvature = "hessian"

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, params: Iterable[torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, hvp: str = "auto", progress: bool = False,
                 distributed: bool | None = None) -> None:
        _check_arguments(model, loss_fn, hvp, dtype)
        check_finite_parameters(model)
        self.model = model
        self.loss_fn = loss_fn
        #: How a batch becomes a loss (:mod:`sharpscope.analysis.objective`).
        self.objective = as_objective(loss_fn, model)
        self.batches = as_batches(data)
        self.weights = batch_weights(self.batches, self.objective)
        #: Whether products are split over ranks and all-reduced.
        self.distributed: bool = use_ranks(distributed)
        self._local = shared_batches(self.batches, self.distributed, self.objective)
        self.progress = main_progress(progress)
        self.device = model_device(model)
        self._snapshot(model, trainable_named_parameters(model, params), dtype)
        self.n_hvp = 0
        self._graph: list[Any] | None = None
        self._affine_bn = _has_batch_norm(model)
        #: Seconds of one trial product on the first batch per method, when ``"auto"`` timed them.
        self.trial_seconds: dict[str, float] = {}
        self._state_cm: contextlib.AbstractContextManager[Any] | None = None
        #: Why ``"func"`` was not usable (None when it was, or was not wanted).
        self.fallback_reason: str | None = None
        self.method: str = self._choose_method(hvp)

    def _snapshot(self, model: nn.Module, chosen: list[tuple[str, nn.Parameter]], dtype: torch.dtype | None) -> None:
        """Copy the chosen parameters (cast to ``dtype``) and everything else the forward pass reads."""
        if not chosen:
            raise UserInputError("the model has no parameter with requires_grad=True: nothing to differentiate")
        chosen_ids = {id(p) for _, p in chosen}
        self.param_names: list[str] = [n for n, _ in chosen]
        self.shapes: list[torch.Size] = [p.shape for _, p in chosen]
        self.numels: list[int] = [p.numel() for _, p in chosen]
        self.dim: int = int(sum(self.numels))
        # Snapshot: the operator is the Hessian at the parameters as they are now.
        self._params = tuple(_cast(p.detach(), dtype).clone() for _, p in chosen)
        self.dtype: torch.dtype = self._params[0].dtype
        self._fixed = {n: _cast(p.detach(), dtype).clone()
                       for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in chosen_ids}
        self._fixed.update({n: _cast(b.detach(), dtype).clone()
                            for n, b in model.named_buffers(remove_duplicate=False)})
        # Tied parameters appear under several names; functional_call needs every alias.
        self._aliases = self._alias_map(model, chosen)

    def _choose_method(self, hvp: str) -> str:
        """The product method, fixed for the operator's life (see the module docstring)."""
        if hvp in ("cached", "autograd"):
            return hvp
        if hvp == "auto" and len(self._local) == 1:
            return "cached"  # one backward per product: the cheapest (measured) whenever one graph fits
        probe = tuple(torch.ones_like(p) for p in self._params)
        trial = [(self._trial_batch(), 1.0)]
        try:
            self._trial_product("func", probe, trial)  # support check (and warm-up), untimed
        except _UNSUPPORTED as exc:
            return self._fall_back(exc, probe, trial, warn=hvp == "func")
        if hvp == "func":
            return "func"
        try:
            self.trial_seconds = {m: self._trial_product(m, probe, trial) for m in ("autograd", "func")}
        except _UNSUPPORTED:
            return "func"  # torch.func works where double backward does not
        return min(self.trial_seconds, key=self.trial_seconds.__getitem__)

    def _trial_batch(self) -> Batch:
        """The first batch with targets (the same on every rank)."""
        return next(b for b, w in zip(self.batches, self.weights) if w > 0)

    def _trial_product(self, method: str, probe: tuple[torch.Tensor, ...], trial: list[_Weighted]) -> float:
        """Seconds one product with ``method`` takes on the trial batch (not counted in ``n_hvp``)."""
        _sync(self.device)
        start = time.perf_counter()
        with eval_mode(self.model), math_attention(self.model):
            if method == "func":
                self._hvp_func(probe, trial, [])
            else:
                self._graph_products([probe], trial, [], cached=False)
        _sync(self.device)
        return time.perf_counter() - start

    def _fall_back(self, unsupported: Exception, probe: tuple[torch.Tensor, ...], trial: list[_Weighted],
                   warn: bool) -> str:
        self._trial_product("autograd", probe, trial)  # an error here is the model's own: it propagates
        detail = (str(unsupported).strip().splitlines() or [""])[0][:200]
        self.fallback_reason = f"{type(unsupported).__name__}: {detail}"
        if warn:
            warnings.warn(f"torch.func cannot compute this model's Hessian-vector product ({self.fallback_reason}); "
                          "falling back to double-backward autograd (hvp='autograd') for every product",
                          RuntimeWarning, stacklevel=4)
        return "autograd"

    # -- context management ------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._state_cm = preserved_model_state(self.model, train=False)
        self._state_cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the cached graph and, inside a ``with`` block, restore the model exactly."""
        self._graph = None
        if self._state_cm is not None:
            cm, self._state_cm = self._state_cm, None
            cm.__exit__(None, None, None)

    # -- flat vectors <-> parameter-shaped tensors --------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector of length ``dim`` into tensors shaped like the parameters (views)."""
        v = self._check_vector(v)
        return [chunk.view(shape) for chunk, shape in zip(torch.split(v, self.numels), self.shapes)]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors into one flat vector (on ``device``, in ``dtype``)."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors (one per parameter), got {len(tensors)}")
        for t, shape, name in zip(tensors, self.shapes, self.param_names):
            if t.shape != shape:
                raise ValueError(f"tensor for {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return torch.cat([t.reshape(-1) for t in tensors]).to(device=self.device, dtype=self.dtype)

    def parameters_vector(self) -> torch.Tensor:
        """The point ``w`` at which the Hessian is taken, as a flat vector."""
        return self.flatten(self._params)

    def _check_vector(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v))
        if v.dim() != 1 or v.numel() != self.dim:
            raise ValueError(f"vector must be 1-D of length dim={self.dim}, got shape {tuple(v.shape)}")
        return v.to(device=self.device, dtype=self.dtype)

    # -- the product ---------------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``; returns a flat tensor (device, dtype)."""
        return self._products([tuple(self.unflatten(v))])[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a block ``V`` of shape ``(dim, k)``: ``k`` products, returned as ``(dim, k)``.

        Equal to the stacked :meth:`matvec` of the columns (``n_hvp`` grows by ``k``), cheaper with
        several batches: the gradient graph of each batch is built once for the block and
        back-propagated ``k`` times (ResNet-20, 2 batches of 16, CPU: 2.0 / 2.8 / 3.2 HVP/s for
        blocks of 1 / 4 / 8; ViT: 1.0 / 1.3 / 1.3). So when ``"auto"`` chose ``"func"`` after timing
        both methods, a block of ``k > 1`` vectors still takes this reverse-over-reverse path, which
        the trial showed to work (an explicit ``hvp="func"`` is kept: ``k`` forward-over-reverse
        products). Vectorising the backward passes (``vmap``, ``is_grads_batched=True``) was measured
        slower than this loop on CPU (ResNet-20, ViT), so it is not used.
        """
        V = self._check_block(V)
        return self._products([tuple(self.unflatten(V[:, j].contiguous())) for j in range(V.shape[1])]).T

    def _check_block(self, V: torch.Tensor) -> torch.Tensor:
        if not isinstance(V, torch.Tensor):
            V = torch.as_tensor(np.asarray(V))
        if V.dim() != 2 or V.shape[0] != self.dim or V.shape[1] < 1:
            raise ValueError(f"block must be 2-D of shape (dim={self.dim}, k >= 1), got shape {tuple(V.shape)}")
        return V.to(device=self.device, dtype=self.dtype)

    def _products(self, columns: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """``H v`` for every column, as a ``(k, dim)`` tensor, summed over ranks and checked."""
        losses: list[torch.Tensor] = []
        with eval_mode(self.model), math_attention(self.model):
            if self.method == "func" and (len(columns) == 1 or "autograd" not in self.trial_seconds):
                outs = [self._hvp_func(vs, self._weighted_batches(), losses) for vs in columns]
            elif self.method == "cached":
                outs = self._graph_products(columns, self._local, losses, cached=True)
            else:
                outs = self._graph_products(columns, self._weighted_batches(), losses, cached=False)
        flat = self._reduced_block(outs, losses, "the Hessian-vector product")
        self.n_hvp += len(columns)
        return flat

    def _reduced(self, out: list[torch.Tensor] | None, losses: list[torch.Tensor],
                 what: str = "the Hessian-vector product") -> torch.Tensor:
        """The flat sum over ranks of the local products, checked (one host synchronisation)."""
        return self._reduced_block([out], losses, what)[0]

    def _reduced_block(self, outs: Sequence[list[torch.Tensor] | None], losses: list[torch.Tensor],
                       what: str) -> torch.Tensor:
        """:meth:`_reduced` for several products at once: ``(k, dim)``, ONE all-reduce and ONE sync."""
        # One buffer for all products and the count of non-finite losses: written in place, no copies.
        payload = torch.empty(len(outs) * self.dim + 1, dtype=self.dtype, device=self.device)
        for j, out in enumerate(outs):
            row = payload[j * self.dim:(j + 1) * self.dim]
            if out is None:
                row.zero_()
            else:
                torch.cat([t.reshape(-1) for t in out], out=row)
        payload[-1] = (torch.stack([(~torch.isfinite(loss)).sum() for loss in losses]).sum() if losses else 0)
        reduce_sum([payload], self.distributed)
        flat = payload[:-1].view(len(outs), self.dim)
        # A sum is finite iff every entry is, unless finite entries overflow it: then check them all (rare).
        ok = torch.stack([payload[-1] == 0, torch.isfinite(flat.sum())]).tolist()
        if not ok[0]:
            raise FloatingPointError("the loss is not finite (NaN/inf); check the model, data and loss_fn")
        if not ok[1] and not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(f"{what} is not finite (NaN/inf); check the model, "
                                     "the data and loss_fn, or use dtype=torch.float64")
        return flat

    __matmul__ = matvec

    def gradient(self) -> torch.Tensor:
        """The full-data gradient at ``w`` as a flat vector (used for the HVP/gradient cost ratio; summed
        over ranks like :meth:`matvec` when the operator is data-parallel)."""
        total: list[torch.Tensor] | None = None
        losses: list[torch.Tensor] = []
        with eval_mode(self.model), math_attention(self.model):
            for batch, weight in self._weighted_batches():
                ps = [p.detach().requires_grad_(True) for p in self._params]
                loss = self._loss(tuple(ps), batch)
                gs = torch.autograd.grad(loss, ps, allow_unused=True)
                gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
                total = _add_weighted(total, gs, weight)
                losses.append(loss.detach())
        return self._reduced(total, losses, "the gradient")

    def _weighted_batches(self) -> Iterable[_Weighted]:
        from .._progress import progress

        return progress(self._local, enabled=self.progress and len(self._local) > 1, desc="HVP batches",
                        total=len(self._local))

    def _tensors(self, ps: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Every tensor the forward pass reads: ``ps`` (under all their tied names) and the fixed snapshot."""
        tensors = dict(self._fixed)
        for (name, aliases), p in zip(self._aliases, ps):
            tensors[name] = p
            for alias in aliases:
                tensors[alias] = p
        return tensors

    def _loss(self, ps: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        """The objective of one batch with the parameters ``ps`` (and the fixed snapshot for the rest)."""
        batch = to_device(batch, self.device, self.dtype)
        with _AffineEvalBatchNorm() if self._affine_bn else contextlib.nullcontext():
            return checked_loss(self.objective(functional_model(self.model, self._tensors(ps)), batch))

    def _hvp_func(self, vs: tuple[torch.Tensor, ...], batches: Iterable[_Weighted],
                  losses: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Forward-over-reverse: ``jvp(grad L_b, w, v)`` per batch, weighted (None for no batch)."""
        total: list[torch.Tensor] | None = None
        for batch, weight in batches:
            if weight == 0:  # no targets: no contribution
                continue

            def grad_and_loss(ps: tuple[torch.Tensor, ...], batch: Batch = batch) -> Any:
                loss = self._loss(ps, batch)
                return loss, loss.detach()

            g_fn = grad(grad_and_loss, has_aux=True)
            _, hv, loss = jvp(g_fn, (self._params,), (vs,), has_aux=True)
            losses.append(loss)
            total = _add_weighted(total, hv, weight)
        return total

    def _graph_products(self, columns: list[tuple[torch.Tensor, ...]], batches: Iterable[_Weighted],
                        losses: list[torch.Tensor], cached: bool) -> list[list[torch.Tensor] | None]:
        """Reverse-over-reverse: per batch, the gradient graph (kept when ``cached``, else rebuilt and
        freed after the batch) back-propagated once per column."""
        totals: list[list[torch.Tensor] | None] = [None] * len(columns)
        if cached and self._graph is None:
            self._graph = [self._gradient_graph(b) if w > 0 else None for b, w in self._local]
        for i, (batch, weight) in enumerate(batches):
            if weight == 0:
                continue
            ps, gs, loss = self._graph[i] if cached else self._gradient_graph(batch)  # type: ignore[index,misc]
            losses.append(loss)
            for j, vs in enumerate(columns):
                hv = self._backward(ps, gs, vs, retain=cached or j < len(columns) - 1)
                totals[j] = _add_weighted(totals[j], hv, weight)
        return totals

    def _gradient_graph(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...], torch.Tensor]:
        """Parameters, their gradient (with its graph) and the detached loss of one batch."""
        ps = tuple(p.detach().requires_grad_(True) for p in self._params)
        with torch.enable_grad():
            loss = self._loss(ps, batch)
            gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        return ps, gs, loss.detach()

    @staticmethod
    def _backward(ps: tuple[torch.Tensor, ...], gs: tuple[Any, ...], vs: tuple[torch.Tensor, ...],
                  retain: bool) -> list[torch.Tensor]:
        # Parameters the loss does not depend on (or only linearly) have zero Hessian rows.
        live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in ps]
        hv = torch.autograd.grad([gs[i] for i in live], list(ps), grad_outputs=[vs[i] for i in live],
                                 retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, ps)]

    @staticmethod
    def _alias_map(model: nn.Module, chosen: list[tuple[str, nn.Parameter]]) -> list[tuple[str, list[str]]]:
        names_of: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(n)
        return [(n, [a for a in names_of[id(p)] if a != n]) for n, p in chosen]

    # -- scipy view ------------------------------------------------------------------------------------
    def as_linear_operator(self) -> LinearOperator:
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out) for ``eigsh`` & co."""

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).detach().cpu().to(torch.float64).numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np.float64)

    def __repr__(self) -> str:
        return (f"HessianOperator(dim={self.dim}, tensors={len(self.shapes)}, batches={len(self.batches)}, "
                f"dtype={self.dtype}, device={self.device}, hvp={self.method!r}, n_hvp={self.n_hvp})")
