"""``backend="pyhessian"``: run the PyHessian package (Yao et al. 2020) and map its output to our results.

PyHessian 0.1 as installed is used unmodified; inside :func:`pyhessian_session` only:

* ``.grad`` is zeroed first (PyHessian adds any stale ``.grad`` into its gradient: a second call on the
  same model would otherwise differentiate the wrong function);
* its ``cuda`` flag follows the model's device (it defaults to True, which fails on a CPU machine);
* ``torch.eig``, removed from torch, is provided for the duration of the call (its ``density`` uses it on
  a symmetric tridiagonal matrix, so ``torch.linalg.eigh`` gives the same answer);
* the global RNG is seeded with ``seed`` and restored afterwards (PyHessian draws from it);
* attention runs on the math kernel (:func:`~sharpscope.analysis.attention.math_attention`): PyHessian
  differentiates its gradient (built with ``create_graph=True`` when the session opens) once more, and
  the fused SDPA kernels and the ``nn.MultiheadAttention`` fast path have no double backward, so
  without it a transformer fails with ``derivative for aten::_scaled_dot_product_flash_attention...``;
* Hessian-vector products are counted by wrapping its HVP functions, and drive the progress bar
  (``progress=True``; PyHessian itself draws none): its total is the most products the call may make
  (``k * max_iter`` power iterations, ``max_iter`` trace probes, ``n_iter * n_runs`` SLQ steps), and
  the bar closes early when PyHessian's own stopping rule ends the call sooner;
* the model's parameters, buffers, ``.grad``, ``requires_grad`` and train/eval flags are restored exactly.

PyHessian understands only ``(inputs, targets)`` batches and a ``criterion(outputs, targets)``: dict
batches and the other objectives (language-model token cross-entropy, a model's own ``.loss``,
``loss_fn(model, batch)``) are refused in one line pointing to ``backend="sharpscope"``.

PyHessian computes the Hessian of the model's dtype, without error bars or convergence information:
residuals of its eigenpairs are computed afterwards with our operator (those extra products are reported
as ``settings["n_hvp_check"]``, not in ``n_hvp``).
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .._progress import progress as progress_bar
from ..errors import UserInputError
from .attention import math_attention
from .batching import Batch, as_batches, batch_size, model_device, preserved_model_state
from .curvature import HessianOperator, LossFn
from .objective import ClassificationLoss, as_objective

_MISSING = object()


def _eig_via_eigh(matrix: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The removed ``torch.eig`` for a symmetric matrix: eigenvalues as ``(n, 2)`` (real, imaginary)."""
    values, vectors = torch.linalg.eigh(matrix)
    pairs = torch.stack([values, torch.zeros_like(values)], dim=1)
    return pairs, (vectors if eigenvectors else torch.empty(0, dtype=matrix.dtype, device=matrix.device))


class _Counter:
    """Counts PyHessian's Hessian-vector products and advances a progress bar with each one."""

    def __init__(self, progress: bool = False, total: int = 0, desc: str = "PyHessian") -> None:
        self.n_hvp = 0
        self.bar = progress_bar(range(total), enabled=progress, desc=desc, total=total) if progress else None

    def tick(self) -> None:
        self.n_hvp += 1
        if self.bar is not None:
            self.bar.update(1)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # type: ignore[attr-defined]


def pyhessian_criterion(model: nn.Module, loss_fn: Any, batches: list[Batch]) -> Any:
    """The ``criterion(outputs, targets)`` to hand PyHessian; refuse what it cannot run (one line)."""
    objective = as_objective(loss_fn, model)
    if not isinstance(objective, ClassificationLoss):
        raise UserInputError(f"backend='pyhessian' needs a loss_fn(outputs, targets); the {objective.name} "
                             "objective is not one: use backend='sharpscope'")
    if not all(isinstance(b, tuple) and len(b) == 2 for b in batches):
        raise UserInputError("backend='pyhessian' understands only (inputs, targets) batches, not dicts of "
                             "tensors: use backend='sharpscope'")
    return objective.loss_fn


@contextlib.contextmanager
def pyhessian_session(model: nn.Module, loss_fn: LossFn, data: Any, seed: int = 0,
                      counter: _Counter | None = None) -> Iterator[tuple[Any, _Counter]]:
    """A ``pyhessian.hessian`` object on ``model`` with the fixes above; yields ``(hessian, counter)``.

    ``counter`` (default: a silent one) counts the products; its progress bar is closed on exit.
    """
    # ``pyhessian.hessian`` the attribute is the class (re-exported by the package); we need the module.
    batches = as_batches(data)
    criterion = pyhessian_criterion(model, loss_fn, batches)
    ph = importlib.import_module("pyhessian.hessian")
    device = model_device(model)
    counter = _Counter() if counter is None else counter
    original_hvp = ph.hessian_vector_product

    def counted_hvp(*args: Any, **kwargs: Any) -> Any:
        counter.tick()
        return original_hvp(*args, **kwargs)

    old_eig = getattr(torch, "eig", _MISSING)
    with preserved_model_state(model, train=False), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []), warnings.catch_warnings(), math_attention(model):
        # PyHessian calls backward(create_graph=True); the .grad cycle it warns about is cleared below.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        ph.hessian_vector_product = counted_hvp
        torch.eig = _eig_via_eigh  # type: ignore[attr-defined]
        try:
            cuda = device.type == "cuda"
            if len(batches) == 1:
                h = ph.hessian(model, criterion, data=batches[0], cuda=cuda)
            else:
                h = ph.hessian(model, criterion, dataloader=batches, cuda=cuda)
                original_dl = h.dataloader_hv_product

                def counted_dl(v: Any) -> Any:
                    counter.tick()
                    return original_dl(v)

                h.dataloader_hv_product = counted_dl
            yield h, counter
        finally:
            counter.close()
            ph.hessian_vector_product = original_hvp
            if old_eig is _MISSING:
                del torch.eig  # type: ignore[attr-defined]
            else:
                torch.eig = old_eig  # type: ignore[attr-defined]
            model.zero_grad(set_to_none=True)  # drop its create_graph gradients before the restore


def _settings(model: nn.Module, batches: list[Batch], seed: int, seconds: float) -> dict[str, Any]:
    from .hessian import _base_settings

    settings = _base_settings(model, seed, "pyhessian", None)
    settings.update({"n_examples": int(sum(batch_size(b) for b in batches)), "n_batches": len(batches),
                     "device": str(model_device(model)), "seconds": seconds})
    return settings


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def pyhessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Any, k: int = 1, tol: float = 1e-3,
                          max_iter: int = 100, seed: int = 0, progress: bool = False) -> Any:
    """PyHessian's top-``k`` power iteration, as an :class:`~sharpscope.analysis.hessian.EigenResult`.

    ``converged`` is PyHessian's own rule (relative change between iterations below ``tol`` before
    ``max_iter`` products per eigenvalue); ``residuals`` are measured with our operator afterwards.
    ``progress`` shows a bar over PyHessian's products (of at most ``k * max_iter``).
    """
    from .hessian import EigenResult, _relative

    start = time.perf_counter()
    batches = as_batches(data)
    pyhessian_criterion(model, loss_fn, batches)  # refused before a progress bar opens
    counter = _Counter(progress, k * max_iter, f"PyHessian top-{k} (power iteration)")
    with pyhessian_session(model, loss_fn, batches, seed, counter) as (h, counter):
        values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        n_hvp = counter.n_hvp
        vecs = torch.stack([_flat(v) for v in vectors], dim=1)
    seconds = time.perf_counter() - start
    values = np.asarray(values, dtype=np.float64)
    with HessianOperator(model, loss_fn, batches, distributed=False) as op:
        vecs = vecs.to(device=op.device, dtype=op.dtype)
        res = np.array([float(torch.linalg.vector_norm(op.matvec(vecs[:, i]) - values[i] * vecs[:, i]))
                        for i in range(k)])
        names, shapes, n_check = list(op.param_names), [tuple(s) for s in op.shapes], op.n_hvp
    settings = _settings(model, batches, seed, seconds)
    settings.update({"k": k, "which": "LA", "tol": tol, "max_iter": max_iter, "n_hvp_check": n_check})
    return EigenResult(eigenvalues=values, eigenvectors=vecs.cpu().numpy(),
                       residuals=_relative(res, values), error_bounds=res,
                       n_hvp=n_hvp, converged=n_hvp < k * max_iter, settings=settings,
                       param_names=names, shapes=shapes)


def pyhessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, max_iter: int = 100, tol: float = 1e-3,
                    seed: int = 0, progress: bool = False) -> Any:
    """PyHessian's Hutchinson trace with its stopping rule, as a :class:`~sharpscope.analysis.hessian.TraceResult`.

    The standard error is computed from its samples (PyHessian reports none); with a single sample it is
    infinite, since nothing is known about the spread.
    """
    from .hessian import TraceResult

    start = time.perf_counter()
    batches = as_batches(data)
    pyhessian_criterion(model, loss_fn, batches)  # refused before a progress bar opens
    counter = _Counter(progress, max_iter, "PyHessian trace (hutchinson)")
    with pyhessian_session(model, loss_fn, batches, seed, counter) as (h, counter):
        samples = np.asarray(h.trace(maxIter=max_iter, tol=tol), dtype=np.float64)
        n_hvp = counter.n_hvp
    stderr = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    settings = _settings(model, batches, seed, time.perf_counter() - start)
    settings.update({"n_samples": max_iter, "tol": tol, "method": "hutchinson"})
    return TraceResult(estimate=float(samples.mean()), stderr=stderr, n_hvp=n_hvp, method="hutchinson",
                       samples=samples, settings=settings)


def pyhessian_density(model: nn.Module, loss_fn: LossFn, data: Any, n_iter: int = 80, n_runs: int = 1,
                      sigma: float | None = None, grid: Any = 1000, seed: int = 0, progress: bool = False) -> Any:
    """PyHessian's SLQ, as a :class:`~sharpscope.analysis.hessian.DensityResult` smoothed like ours.

    PyHessian returns no residuals; they are reported as ``inf`` (unknown), so
    :meth:`DensityResult.top_eigenvalues` will not claim a bound it does not have.
    """
    from .hessian import DensityResult, _density_grid, smoothed_density

    start = time.perf_counter()
    batches = as_batches(data)
    pyhessian_criterion(model, loss_fn, batches)  # refused before a progress bar opens
    counter = _Counter(progress, n_iter * n_runs, "PyHessian SLQ")
    with pyhessian_session(model, loss_fn, batches, seed, counter) as (h, counter):
        eigen_runs, weight_runs = h.density(iter=n_iter, n_v=n_runs)
        n_hvp = counter.n_hvp
    nodes = [np.asarray(e, dtype=np.float64) for e in eigen_runs]
    weights = [np.asarray(w, dtype=np.float64) for w in weight_runs]
    values, sigma = _density_grid(nodes, sigma, grid)
    settings = _settings(model, batches, seed, time.perf_counter() - start)
    settings.update({"n_iter": n_iter, "n_runs": n_runs})
    return DensityResult(nodes=nodes, weights=weights, residuals=[np.full(len(n), np.inf) for n in nodes],
                         grid=values, density=smoothed_density(nodes, weights, values, sigma), sigma=sigma,
                         n_hvp=n_hvp, settings=settings)
