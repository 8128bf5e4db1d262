"""Hessian spectrum of a trained network: top-k eigenvalues, trace, spectral density, per-layer curvature.

All algorithms run on :class:`~sharpscope.analysis.curvature.HessianOperator` (Hessian-vector products of
the full-data mean loss, model in eval mode) and return self-describing results.

* :func:`hessian_eigenvalues` -- thick-restart Lanczos with full reorthogonalisation, convergence checked
  after every product (:mod:`sharpscope.analysis.lanczos`). Power iteration (PyHessian; Yao et al. 2020)
  converges like ``(lambda_2/lambda_1)^j``; Lanczos like a Chebyshev polynomial, roughly
  ``exp(-2 j sqrt(gap))``, and gives error bounds for free.
* :func:`hessian_trace` -- Hutchinson (1989): ``tr(H) = E[z^T H z]`` for Rademacher ``z``; and Hutch++
  (Meyer, Musco, Musco & Woodruff 2021): with a third of the budget sketch ``Q = orth(H S)``, with a
  third compute ``tr(Q^T H Q)`` exactly, and spend the rest on Hutchinson for the deflated remainder
  ``tr((I - QQ^T) H (I - QQ^T))``. Its error falls like ``1/m`` instead of ``1/sqrt(m)``. Their
  independent products run in blocks of :data:`BLOCK` columns
  (:meth:`~sharpscope.analysis.curvature.HessianOperator.matmat`: one gradient graph per batch per
  block), with the numbers of the column-by-column loop.
* :func:`hessian_density` -- stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Ubaru et al.
  2017): for a normalised Rademacher probe ``v``, ``n_iter`` Lanczos steps give nodes ``theta_i`` and
  weights ``w_i`` with ``sum_i w_i theta_i^j = v^T H^j v`` for ``j < 2 n_iter``, whose mean over probes is
  ``tr(H^j) / dim``; the density is ``mean_runs sum_i w_i N(x; theta_i, sigma^2)``.
* :func:`layer_curvature` -- the same on each diagonal block ``H_tt`` (one parameter tensor ``t``).

``curvature="ggn"`` runs every one of them on the generalised Gauss-Newton matrix instead
(:class:`~sharpscope.analysis.ggn.GGNOperator`, ``G = J^T H_loss J``, positive semi-definite); the
results' ``settings["curvature"]`` says which matrix was analysed.

Every result follows the one result protocol (:class:`~sharpscope.analysis.results.Result`):
``.to_dataframe()``, ``.save(path)``, ``Class.load(path)`` (or ``sharpscope.load``), and ``.settings``
with ``settings["provenance"]``. Before any long work each analysis refuses non-finite weights (naming
the tensors) and runs the model once on two examples of the first batch, so bad input is one line.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .._progress import progress as progress_bar
from .._validate import choice, integer, number, positive_int
from ..errors import UserInputError
from ..threads import analysis_threads
from .batching import Batch, batch_size, prepared_batches, trainable_named_parameters
from .curvature import HVP_METHODS, HessianOperator, LossFn
from .ggn import GGNOperator, check_ggn_objective
from .lanczos import _error_bounds, krylov_basis, lanczos_quadrature, thick_restart_lanczos
from .parallel import (
    gather_in_order,
    main_progress,
    my_indices,
    rank_and_world,
    reduce_sum,
    sum_int,
    use_ranks,
)
from .results import (
    Result,
    TableResult,
    damaged_result_file,
    model_fingerprint,
    provenance,
    read_dataset,
    write_dataset,
)

BACKENDS = ("sharpscope", "pyhessian")
#: How the stochastic estimators use several ranks: split the data of every product, or the probes.
SPLITS = ("data", "probes")
TRACE_METHODS = ("hutch++", "hutchinson", "krylov")
#: The curvature matrices the analyses run on: the loss Hessian or the generalised Gauss-Newton matrix.
CURVATURES = ("hessian", "ggn")
#: Most Lanczos steps one SLQ run may take: the full reorthogonalisation costs ``O(n_iter^2 dim)`` and the
#: basis ``n_iter * dim`` numbers, while 80-100 steps already resolve a density (Ghorbani et al. use 90).
MAX_SLQ_STEPS = 1000
#: Columns per block product in the trace estimators (Hutchinson, Hutch++, the exact per-layer trace).
#: With several batches a block of ``k`` costs one gradient graph per batch and ``k`` backward passes
#: instead of ``k`` of each (ResNet-20, 2 batches, CPU: 2.0 / 2.8 / 3.2 HVP/s for blocks of 1 / 4 / 8);
#: beyond 8 the saving is small and the memory (``~3 k dim`` numbers) keeps growing.
BLOCK = 8


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------
def _check_backend(backend: str) -> None:
    choice(backend, "backend", BACKENDS)


def _pyhessian_options(params: Any, dtype: Any) -> None:
    if params is not None or dtype is not None:
        raise UserInputError("backend='pyhessian' works on all trainable parameters in the model's dtype; "
                             "drop params=/dtype= or use backend='sharpscope'")


def _check_curvature(curvature: Any, model: nn.Module, loss_fn: Any, backend: str = "sharpscope",
                     hvp: Any = "auto") -> str:
    """Validate ``curvature`` and what it allows: the GGN has one product method and no PyHessian backend."""
    curvature = choice(curvature, "curvature", CURVATURES)
    if curvature == "ggn":
        if backend == "pyhessian":
            raise UserInputError("backend='pyhessian' computes only the Hessian; use backend='sharpscope' with "
                                 "curvature='ggn'")
        if choice(hvp, "hvp", HVP_METHODS) != "auto":
            raise UserInputError(f"hvp={hvp!r} chooses how a Hessian-vector product is computed; the Gauss-Newton "
                                 "product has one method (jvp + vjp): drop hvp= or use curvature='hessian'")
        check_ggn_objective(loss_fn, model)
    return curvature


def _operator(curvature: str, model: nn.Module, loss_fn: Any, batches: list[Batch], *,
              params: Iterable[torch.Tensor] | None, dtype: torch.dtype | None, hvp: str,
              distributed: bool | None) -> HessianOperator:
    """The operator of ``curvature`` (:data:`CURVATURES`) on the prepared batches."""
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, batches, params=params, dtype=dtype, distributed=distributed)
    return HessianOperator(model, loss_fn, batches, params=params, dtype=dtype, hvp=hvp, distributed=distributed)


def _dimension(model: nn.Module, params: Iterable[torch.Tensor] | None) -> int:
    """Number of scalar parameters the Hessian is taken over (its side), without building an operator."""
    dim = sum(p.numel() for _, p in trainable_named_parameters(model, params))
    if dim == 0:
        raise UserInputError("the model has no parameter with requires_grad=True: nothing to differentiate")
    return int(dim)


def _data_settings(op: HessianOperator, split: str = "data", probes: bool = False) -> dict[str, Any]:
    world = rank_and_world(op.distributed or probes)[1]
    return {"n_examples": int(sum(batch_size(b) for b in op.batches)), "n_batches": len(op.batches),
            "curvature": op.curvature, "dim": op.dim,
            "dtype": str(op.dtype).replace("torch.", ""), "hvp": op.method,
            "device": str(op.device), "world_size": world, "split": split if world > 1 else None}


def _parallel_mode(distributed: bool | None, split: str) -> tuple[bool, bool]:
    """``(data-parallel operator, probes split over ranks)`` for ``split`` in :data:`SPLITS`."""
    choice(split, "split", SPLITS)
    active = use_ranks(distributed)
    return active and split == "data", active and split == "probes"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, op: HessianOperator) -> torch.Tensor:
    """Random signs drawn on the CPU (same numbers on every device), moved to the operator."""
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    return z.to(device=op.device, dtype=op.dtype)


def _gaussian(n: int, gen: torch.Generator, op: HessianOperator) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)


class _HvpProgress:
    """A progress bar counting HVPs, with the current convergence measure as postfix."""

    def __init__(self, enabled: bool, total: int, desc: str, offset: int = 0) -> None:
        self.bar = progress_bar(range(total), enabled=enabled, desc=desc, total=total)
        self.enabled = enabled
        self.done = offset

    def step(self, n: int, measure: float | None = None) -> None:
        """Advance to ``n`` products counted by the operator (which may have started above zero)."""
        if not self.enabled:
            return
        self.bar.update(n - self.done)  # type: ignore[attr-defined]
        self.done = n
        if measure is not None and math.isfinite(measure):
            self.bar.set_postfix(rel_err=f"{measure:.1e}")  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.enabled:
            self.bar.close()  # type: ignore[attr-defined]


def _base_settings(model: nn.Module, seed: int, backend: str, op: HessianOperator | None, split: str = "data",
                   probes: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": int(seed), "backend": backend, "model_fingerprint": model_fingerprint(model),
                                "curvature": "hessian", "provenance": provenance()}
    if op is not None:
        settings.update(_data_settings(op, split, probes))
    return settings


# ---------------------------------------------------------------------------------------------------
# Top-k eigenvalues
# ---------------------------------------------------------------------------------------------------
@dataclass
class EigenResult(Result):
    """Extreme Hessian eigenpairs.

    Attributes:
        eigenvalues: wanted end first -- descending for ``which="LA"``, ascending (most negative first)
            for ``which="SA"``.
        eigenvectors: ``(dim, k)`` unit vectors in the flat parameter order of ``param_names`` (or None).
        residuals: ``||H v - lambda v|| / |lambda|`` of each pair.
        error_bounds: bound on ``|lambda_true - lambda|`` (absolute; see :mod:`~sharpscope.analysis.lanczos`).
        n_hvp: full-data Hessian-vector products used.
        converged: every pair met ``tol``.
        settings: which, k, tol, max_iter, seed, backend, data and model identity, wall time, provenance.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    residuals: np.ndarray
    error_bounds: np.ndarray
    n_hvp: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)
    param_names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    KIND = "hessian_eigenvalues"

    def eigenvector_tensors(self, i: int = 0) -> dict[str, torch.Tensor]:
        """Eigenvector ``i`` split into tensors shaped like the parameters, by parameter name."""
        if self.eigenvectors is None:
            raise UserInputError("this result was computed or saved without eigenvectors")
        flat = torch.as_tensor(self.eigenvectors[:, i])
        sizes = [int(np.prod(s)) for s in self.shapes]
        return {n: c.reshape(s) for n, c, s in zip(self.param_names, torch.split(flat, sizes), self.shapes)}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per eigenpair: rank, eigenvalue, residual, error_bound, converged."""
        return pd.DataFrame({"rank": np.arange(len(self.eigenvalues)), "eigenvalue": self.eigenvalues,
                             "residual": self.residuals, "error_bound": self.error_bounds,
                             "converged": self.converged})

    def save(self, path: str | Path, eigenvectors: bool = True) -> Path:
        """Write a netCDF result file (eigenvectors included unless ``eigenvectors=False``)."""
        data = {"eigenvalue": ("rank", np.asarray(self.eigenvalues, dtype=np.float64)),
                "residual": ("rank", np.asarray(self.residuals, dtype=np.float64)),
                "error_bound": ("rank", np.asarray(self.error_bounds, dtype=np.float64))}
        if eigenvectors and self.eigenvectors is not None:
            data["eigenvector"] = (("parameter", "rank"), np.asarray(self.eigenvectors))
        ds = xr.Dataset(data, coords={"rank": np.arange(len(self.eigenvalues))})
        meta = {"n_hvp": self.n_hvp, "converged": self.converged, "settings": self.settings,
                "param_names": self.param_names, "shapes": [list(s) for s in self.shapes]}
        return write_dataset(ds, path, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path) -> EigenResult:
        """Read a file written by :meth:`save` (also by sharpscope 0.1)."""
        ds, meta = read_dataset(path, cls.KIND)
        with damaged_result_file(path, cls.KIND):
            vecs = ds["eigenvector"].values if "eigenvector" in ds else None
            return cls(eigenvalues=ds["eigenvalue"].values, eigenvectors=vecs, residuals=ds["residual"].values,
                       error_bounds=ds["error_bound"].values, n_hvp=int(meta["n_hvp"]),
                       converged=bool(meta["converged"]), settings=dict(meta["settings"]),
                       param_names=list(meta["param_names"]), shapes=[tuple(s) for s in meta["shapes"]])


def _relative(res: np.ndarray, values: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(values), np.finfo(np.float64).tiny)
    return np.asarray(res, dtype=np.float64) / scale


def _warn_negative_dominant(ritz: np.ndarray, top: float) -> None:
    lowest = float(np.min(ritz))
    # The lowest Ritz value is an upper bound on the smallest eigenvalue, so this never warns wrongly.
    if lowest < 0 and -lowest > abs(top):
        warnings.warn(f"the largest-magnitude Hessian eigenvalue is negative (about {lowest:.4g}, larger in size "
                      f"than the top eigenvalue {top:.4g}): the point is not near a minimum; power iteration "
                      "(PyHessian) would report this negative value as the 'top' eigenvalue", RuntimeWarning,
                      stacklevel=3)


def _check_k(k: int, dim: int) -> None:
    if k > dim:
        raise UserInputError(f"k={k} is larger than the number of parameters ({dim}, the size of the Hessian); "
                             f"use k <= {dim}")


@analysis_threads
def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Any, k: int = 1, which: str = "LA",
                        tol: float = 1e-3, max_iter: int = 100, seed: int = 0, backend: str = "sharpscope",
                        params: Iterable[torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                        hvp: str = "auto", max_basis: int | None = None, eigenvectors: bool = True,
                        progress: bool = True, distributed: bool | None = None,
                        curvature: str = "hessian") -> EigenResult:
    """The ``k`` largest (``which="LA"``) or most negative (``"SA"``) eigenvalues of the loss Hessian.

    Args:
        model, loss_fn, data: see :class:`~sharpscope.analysis.curvature.HessianOperator`.
        k: number of eigenpairs, ``1 <= k <= dim``.
        which: ``"LA"`` largest algebraic or ``"SA"`` smallest algebraic.
        tol: stop when every wanted eigenvalue's error bound is below ``tol * |lambda|`` (relative).
        max_iter: at most this many Hessian-vector products in total (``converged=False`` and a warning
            if exhausted). With ``backend="pyhessian"``: its per-eigenvalue power-iteration limit.
        seed: seeds the start vector.
        backend: ``"sharpscope"`` (Lanczos) or ``"pyhessian"`` (PyHessian's power iteration, LA only).
        params, dtype, hvp: passed to the operator (a subset of tensors, float64, HVP method).
        max_basis: Lanczos basis size before a thick restart (default ``max(2k + 10, 20)``).
        eigenvectors: keep the eigenvectors in the result.
        progress: show a progress bar (on rank 0).
        distributed: data-parallel over the ranks of ``torch.distributed`` (``None``: when a process group
            with several ranks is initialised; :mod:`~sharpscope.analysis.parallel`). Each product is
            all-reduced and Lanczos runs with the same seed on every rank, so every rank holds the same
            result.
        curvature: ``"hessian"`` (default) or ``"ggn"``: the generalised Gauss-Newton matrix
            (:class:`~sharpscope.analysis.ggn.GGNOperator`; needs a loss of the model's outputs, ``hvp="auto"``
            and ``backend="sharpscope"``).

    Raises ``UserInputError`` for bad arguments, ``k`` above the number of parameters, non-finite weights
    or a model that cannot run on the data. Warns (``RuntimeWarning``) when the largest-magnitude
    eigenvalue is negative, and when not converged.
    """
    _check_backend(backend)
    k, max_iter = positive_int(k, "k"), positive_int(max_iter, "max_iter")
    choice(which, "which", ("LA", "SA"))
    tol = number(tol, "tol (a relative tolerance)", minimum=0.0, maximum=1.0, strict_minimum=True)
    seed = integer(seed, "seed", minimum=None)
    curvature = _check_curvature(curvature, model, loss_fn, backend, hvp)
    if backend == "pyhessian":
        _pyhessian_options(params, dtype)
        if which != "LA":
            raise UserInputError("backend='pyhessian' computes only the top eigenvalues (which='LA')")
    batches = prepared_batches(model, loss_fn, data)
    _check_k(k, _dimension(model, params))
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_eigenvalues

        return pyhessian_eigenvalues(model, loss_fn, batches, k=k, tol=tol, max_iter=max_iter, seed=seed,
                                     progress=progress)
    result, ritz = _lanczos_eigen(model, loss_fn, batches, k=k, which=which, tol=tol, max_iter=max_iter,
                                  seed=seed, params=params, dtype=dtype, hvp=hvp, max_basis=max_basis,
                                  eigenvectors=eigenvectors, progress=main_progress(progress),
                                  distributed=use_ranks(distributed), curvature=curvature)
    if which == "LA":
        _warn_negative_dominant(ritz, float(result.eigenvalues[0]))
    if not result.converged:
        warnings.warn(f"Lanczos did not reach tol={tol} within max_iter={max_iter} Hessian-vector products "
                      f"(relative error bounds {result.error_bounds / np.abs(result.eigenvalues)}); "
                      "raise max_iter", RuntimeWarning, stacklevel=2)
    return result


def _lanczos_eigen(model: nn.Module, loss_fn: LossFn, batches: list[Batch], *, k: int, which: str, tol: float,
                   max_iter: int, seed: int, params: Iterable[torch.Tensor] | None, dtype: torch.dtype | None,
                   hvp: str, max_basis: int | None, eigenvectors: bool,
                   progress: bool, distributed: bool,
                   curvature: str = "hessian") -> tuple[EigenResult, np.ndarray]:
    """Thick-restart Lanczos on the operator; the result and every Ritz value of the last projection."""
    start = time.perf_counter()
    with _operator(curvature, model, loss_fn, batches, params=params, dtype=dtype, hvp=hvp,
                   distributed=distributed) as op:
        bar = _HvpProgress(progress, max_iter, f"Lanczos top-{k} ({which})")
        try:
            out = thick_restart_lanczos(op.matvec, _gaussian(op.dim, _generator(seed), op), k=k, which=which,
                                        tol=tol, max_matvec=max_iter, max_basis=max_basis, seed=seed,
                                        on_step=bar.step)
        finally:
            bar.close()
        settings = _base_settings(model, seed, "sharpscope", op)
        settings.update({"k": k, "which": which, "tol": tol, "max_iter": max_iter,
                         "max_basis": max_basis, "seconds": time.perf_counter() - start})
        result = EigenResult(
            eigenvalues=np.asarray(out.values, dtype=np.float64),
            eigenvectors=out.vectors.detach().cpu().numpy() if eigenvectors else None,
            residuals=_relative(out.residuals, out.values), error_bounds=np.asarray(out.error_bounds),
            n_hvp=op.n_hvp, converged=out.converged, settings=settings, param_names=list(op.param_names),
            shapes=[tuple(s) for s in op.shapes])
    return result, out.ritz_values


# ---------------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------------
@dataclass
class TraceResult(Result):
    """A stochastic estimate of ``tr(H)``.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error. Hutchinson: sample standard deviation of ``z^T H z`` over
            ``sqrt(m)``. Hutch++: conditional on the sketch ``Q`` the exact part ``tr(Q^T H Q)`` has no
            error, and the rest is a Hutchinson mean of ``m_r`` i.i.d. unbiased samples of the deflated
            trace, so the standard error is their sample standard deviation over ``sqrt(m_r)``; it is
            valid for every ``Q``, hence unconditionally (the estimator is unbiased for every ``Q``).
        n_hvp: Hessian-vector products used.
        method: ``"hutch++"``, ``"hutchinson"``, ``"krylov"`` or ``"exact"`` (sketch spanning the space).
        samples: the Hutchinson samples (for Hutch++: of the deflated remainder).
        exact_part: ``tr(Q^T H Q)`` for Hutch++ (0 for Hutchinson).
    """

    estimate: float
    stderr: float
    n_hvp: int
    method: str
    samples: np.ndarray
    exact_part: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    KIND = "hessian_trace"

    def to_dataframe(self) -> pd.DataFrame:
        """One row: method, estimate, stderr, n_hvp."""
        return pd.DataFrame({"method": [self.method], "estimate": [self.estimate], "stderr": [self.stderr],
                             "n_hvp": [self.n_hvp]})

    def save(self, path: str | Path) -> Path:
        """Write a netCDF result file: the samples, the estimate and the settings."""
        ds = xr.Dataset({"sample": ("probe", np.asarray(self.samples, dtype=np.float64))})
        meta = {"estimate": self.estimate, "stderr": self.stderr, "n_hvp": self.n_hvp, "method": self.method,
                "exact_part": self.exact_part, "settings": self.settings}
        return write_dataset(ds, path, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        """Read a file written by :meth:`save` (also by sharpscope 0.1)."""
        ds, meta = read_dataset(path, cls.KIND)
        with damaged_result_file(path, cls.KIND):
            return cls(estimate=float(meta["estimate"]), stderr=float(meta["stderr"]), n_hvp=int(meta["n_hvp"]),
                       method=str(meta["method"]), samples=ds["sample"].values,
                       exact_part=float(meta["exact_part"]), settings=dict(meta["settings"]))


def _column_blocks(op: HessianOperator, M: torch.Tensor, indices: Sequence[int]
                   ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(cols, H M[:, cols])`` for ``indices`` in blocks of at most :data:`BLOCK` columns, each product
    block as ``(len(cols), dim)`` contiguous rows.

    One :meth:`~sharpscope.analysis.curvature.HessianOperator.matmat` per block: the gradient graph of
    each batch is built once per block instead of once per column (``n_hvp`` still grows by one per
    column), and a data-parallel operator all-reduces each block once. Blocks bound the extra memory to
    about ``3 * BLOCK * dim`` numbers.
    """
    indices = list(indices)
    for lo in range(0, len(indices), BLOCK):
        cols = indices[lo:lo + BLOCK]
        yield cols, op.matmat(M[:, cols]).T  # matmat returns a transposed (k, dim) buffer: rows are contiguous


def _hutchinson_samples(op: HessianOperator, Z: torch.Tensor, bar: _HvpProgress, probes: bool) -> np.ndarray:
    """``z_i^T H z_i`` for every column; with ``probes`` each rank does its columns and the rest is summed in."""
    out = torch.zeros(Z.shape[1], dtype=torch.float64)
    for cols, rows in _column_blocks(op, Z, my_indices(Z.shape[1], probes)):
        out[cols] = torch.stack([torch.dot(Z[:, i], row) for i, row in zip(cols, rows)]).cpu().to(torch.float64)
        bar.step(op.n_hvp)
    return reduce_sum([out], probes)[0].numpy()  # x + 0 + ... + 0 = x: the gather is exact


def _sketch(op: HessianOperator, S: torch.Tensor, probes: bool) -> torch.Tensor:
    """``H S`` in blocks of columns (with ``probes``: each rank its columns, gathered exactly by a sum)."""
    Y = torch.zeros_like(S)
    for cols, rows in _column_blocks(op, S, my_indices(S.shape[1], probes)):
        Y[:, cols] = rows.T
    return reduce_sum([Y], probes)[0]


def _projected_trace(op: HessianOperator, Q: torch.Tensor, bar: _HvpProgress, probes: bool) -> float:
    """``tr(Q^T H Q) = sum_i q_i^T H q_i``, added in column order whatever the split."""
    return float(sum(_hutchinson_samples(op, Q, bar, probes).tolist()))


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def _check_trace_budget(n_samples: Any, method: Any) -> int:
    choice(method, "method", TRACE_METHODS)
    minimum = 2 if method == "hutchinson" else 4
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < minimum:
        raise UserInputError(f"n_samples must be an integer >= {minimum} for method={method!r} (a standard error "
                             f"needs at least two Hutchinson samples), got {n_samples!r}")
    return int(n_samples)


def _deflated(op: HessianOperator, exact: float, basis: torch.Tensor, n_rest: int, gen: torch.Generator,
              bar: _HvpProgress, start: int, method: str, probes: bool) -> TraceResult:
    """``exact + tr((I - P) H (I - P))`` by Hutchinson, ``P`` the projector on the columns of ``basis``.

    When the basis spans the whole space the trace is ``exact`` with no error (method ``"exact"``).
    """
    if basis.shape[1] >= op.dim:
        return TraceResult(estimate=exact, stderr=0.0, n_hvp=sum_int(op.n_hvp - start, probes), method="exact",
                           samples=np.zeros(0), exact_part=exact)
    G = _rademacher((op.dim, n_rest), gen, op)
    G = G - basis @ (basis.T @ G)
    samples = _hutchinson_samples(op, G, bar, probes)
    return TraceResult(estimate=exact + float(samples.mean()), stderr=_stderr(samples),
                       n_hvp=sum_int(op.n_hvp - start, probes), method=method, samples=samples, exact_part=exact)


def _hutchinson_trace(op: HessianOperator, n_samples: int, gen: torch.Generator, bar: _HvpProgress,
                      start: int, probes: bool) -> TraceResult:
    """``mean_i z_i^T H z_i`` over ``n_samples`` Rademacher probes."""
    samples = _hutchinson_samples(op, _rademacher((op.dim, n_samples), gen, op), bar, probes)
    return TraceResult(estimate=float(samples.mean()), stderr=_stderr(samples),
                       n_hvp=sum_int(op.n_hvp - start, probes), method="hutchinson", samples=samples)


def _krylov_trace(op: HessianOperator, n_samples: int, gen: torch.Generator, bar: _HvpProgress,
                  start: int, probes: bool) -> TraceResult:
    """``tr(V^T H V)`` of a Krylov basis (half the budget) plus Hutchinson on the deflated rest."""
    if probes:
        raise UserInputError("split='probes' does not apply to method='krylov' (its Krylov basis is built one "
                             "product after the other); use split='data' or method='hutch++'")
    V, T, _ = krylov_basis(lambda u: _tick(op.matvec(u), bar, op), _rademacher((op.dim,), gen, op),
                           n_samples // 2)
    return _deflated(op, float(np.trace(T)), V.T, n_samples - V.shape[0], gen, bar, start, "krylov", probes)


def _hutchpp_trace(op: HessianOperator, n_samples: int, gen: torch.Generator, bar: _HvpProgress,
                   start: int, probes: bool) -> TraceResult:
    """Hutch++: ``Q = orth(H S)`` (a third), ``tr(Q^T H Q)`` (a third), Hutchinson on the rest."""
    n_sketch = n_samples // 3
    S = _rademacher((op.dim, min(n_sketch, op.dim)), gen, op)
    Y = _sketch(op, S, probes)
    bar.step(op.n_hvp)
    Q, _ = torch.linalg.qr(Y)
    exact = _projected_trace(op, Q, bar, probes)
    return _deflated(op, exact, Q, n_samples - 2 * n_sketch, gen, bar, start, "hutch++", probes)


_TRACE_ESTIMATORS = {"hutchinson": _hutchinson_trace, "krylov": _krylov_trace, "hutch++": _hutchpp_trace}


def trace_estimate(op: HessianOperator, n_samples: int, method: str = "hutch++", seed: int = 0,
                   progress: bool = False, split_probes: bool = False) -> TraceResult:
    """Trace of the operator's Hessian with ``n_samples`` Hessian-vector products (see :func:`hessian_trace`).

    ``split_probes``: every rank of ``torch.distributed`` draws the same probes (same seed) and computes
    the products of its share of them (probe ``i`` on rank ``i mod N``); the products are gathered so
    every rank holds the result a single process gets with the same probes. ``op`` should then not be
    data-parallel itself. ``n_hvp`` counts the products of all ranks.
    """
    n_samples = _check_trace_budget(n_samples, method)
    start = op.n_hvp
    bar = _HvpProgress(main_progress(progress), n_samples, f"trace ({method})", offset=start)
    try:
        return _TRACE_ESTIMATORS[method](op, n_samples, _generator(seed), bar, start, split_probes)
    finally:
        bar.close()


@analysis_threads
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, n_samples: int = 60, method: str = "hutch++",
                  seed: int = 0, backend: str = "sharpscope", params: Iterable[torch.Tensor] | None = None,
                  dtype: torch.dtype | None = None, hvp: str = "auto", tol: float = 1e-3,
                  progress: bool = True, distributed: bool | None = None, split: str = "data",
                  curvature: str = "hessian") -> TraceResult:
    """Estimate ``tr(H)`` with ``n_samples`` Hessian-vector products and report a standard error.

    Args:
        n_samples: the HVP budget (Hutch++ splits it in thirds; at least 4, Hutchinson at least 2).
        method: ``"hutch++"`` (default; error ~ 1/m), ``"hutchinson"`` (error ~ 1/sqrt(m)) or ``"krylov"``:
            Hutch++ with the sketch replaced by a Krylov basis ``V`` (half the budget, Lanczos with full
            reorthogonalisation from a Rademacher vector); ``tr(V^T H V)`` comes free with the basis and the
            other half estimates ``tr((I - VV^T) H (I - VV^T))`` by Hutchinson. The Krylov space captures
            the dominant eigendirections of a Hessian far better than one product ``H S`` (Chen & Hallman
            2023, "Krylov-aware stochastic trace estimation"), so on outlier-dominated spectra its error is
            smaller at the same budget. Same standard error argument as Hutch++.
        seed: seeds the Rademacher probes.
        backend: ``"pyhessian"`` runs PyHessian's Hutchinson with its own stopping rule
            (relative change below ``tol``, at most ``n_samples`` probes).
        distributed: use the ranks of ``torch.distributed`` (``None``: when a process group with several
            ranks is initialised).
        split: with several ranks, ``"data"`` splits the batches of every product (all-reduced), ``"probes"``
            gives each rank its share of the independent probes (each rank then needs all the data; the
            sketch/exact/Hutchinson products of Hutch++ are each divided among the ranks and gathered).
            Either way every rank holds the estimate one process computes with the same probes.
        curvature: ``"hessian"`` (default) or ``"ggn"`` (the Gauss-Newton matrix, as in
            :func:`hessian_eigenvalues`).
    """
    _check_backend(backend)
    seed = integer(seed, "seed", minimum=None)
    curvature = _check_curvature(curvature, model, loss_fn, backend, hvp)
    data_parallel, probes = _parallel_mode(distributed, split)
    if backend == "pyhessian":  # its Hutchinson loop: at most n_samples probes, any number >= 1
        _pyhessian_options(params, dtype)
        n_samples = positive_int(n_samples, "n_samples")
        tol = number(tol, "tol (a relative tolerance)", minimum=0.0, strict_minimum=True)
    else:
        n_samples = _check_trace_budget(n_samples, method)
    batches = prepared_batches(model, loss_fn, data)
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_trace

        return pyhessian_trace(model, loss_fn, batches, max_iter=n_samples, tol=tol, seed=seed, progress=progress)
    start = time.perf_counter()
    with _operator(curvature, model, loss_fn, batches, params=params, dtype=dtype, hvp=hvp,
                   distributed=data_parallel) as op:
        result = trace_estimate(op, n_samples, method, seed, progress, split_probes=probes)
        result.settings = _base_settings(model, seed, backend, op, split, probes)
    result.settings.update({"n_samples": n_samples, "method": method, "seconds": time.perf_counter() - start})
    return result


# ---------------------------------------------------------------------------------------------------
# Spectral density
# ---------------------------------------------------------------------------------------------------
@dataclass
class DensityResult(Result):
    """Stochastic Lanczos quadrature of the Hessian spectrum.

    Attributes:
        nodes, weights: one array per run (Ritz values and Gauss weights, weights summing to 1).
        residuals: Ritz residual of every node (small for converged extreme nodes).
        grid, density: the smoothed density ``mean_runs sum_i w_i N(x; node_i, sigma^2)`` on ``grid``
            (integrates to 1).
        sigma: the Gaussian width.
        n_hvp: Hessian-vector products used.
        settings: n_iter, n_runs, seed, backend, data and model identity, wall time, provenance.
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    residuals: list[np.ndarray]
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    n_hvp: int
    settings: dict[str, Any] = field(default_factory=dict)

    KIND = "hessian_density"

    def density_on(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The smoothed density on another grid or with another width (no new HVPs)."""
        return smoothed_density(self.nodes, self.weights, np.asarray(grid, dtype=np.float64),
                                self.sigma if sigma is None else sigma)

    def moments(self, order: int = 3) -> np.ndarray:
        """``mean_runs sum_i w_i node_i^j`` for ``j = 0..order`` (estimates of ``tr(H^j) / dim``)."""
        return np.array([np.mean([np.sum(w * n ** j) for n, w in zip(self.nodes, self.weights)])
                         for j in range(order + 1)])

    def top_eigenvalues(self, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` largest eigenvalues reused from the Lanczos runs, with their error bounds.

        The run whose top-``k`` Ritz values have the smallest worst relative bound is used (Ritz values
        of different runs approximate the same eigenvalues, so they are not pooled).
        """
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for nodes, res in zip(self.nodes, self.residuals):
            if len(nodes) < k:
                continue
            bounds = _error_bounds(nodes, res)
            order = np.argsort(nodes)[::-1][:k]
            worst = float(np.max(bounds[order] / np.maximum(np.abs(nodes[order]), np.finfo(float).tiny)))
            if best is None or worst < best[0]:
                best = (worst, nodes[order], bounds[order])
        if best is None:
            raise UserInputError(f"no run has {k} nodes; use n_iter >= {k}")
        return best[1], best[2]

    def to_dataframe(self) -> pd.DataFrame:
        """The smoothed density, tidy: columns ``eigenvalue``, ``density``."""
        return pd.DataFrame({"eigenvalue": self.grid, "density": self.density})

    def nodes_dataframe(self) -> pd.DataFrame:
        """Every node of every run: columns ``run``, ``node``, ``weight``, ``residual``."""
        return pd.DataFrame({
            "run": np.concatenate([np.full(len(n), r) for r, n in enumerate(self.nodes)]),
            "node": np.concatenate(self.nodes), "weight": np.concatenate(self.weights),
            "residual": np.concatenate(self.residuals)})

    def save(self, path: str | Path) -> Path:
        """Write a netCDF result file: the smoothed density, every node of every run, the settings."""
        nodes = self.nodes_dataframe()
        ds = xr.Dataset({"density": ("grid", self.density),
                         "node_run": ("node", nodes["run"].to_numpy().astype(np.int32)),
                         "node_value": ("node", nodes["node"].to_numpy()),
                         "node_weight": ("node", nodes["weight"].to_numpy()),
                         "node_residual": ("node", nodes["residual"].to_numpy())},
                        coords={"grid": self.grid})
        meta = {"sigma": self.sigma, "n_hvp": self.n_hvp, "n_runs": len(self.nodes), "settings": self.settings}
        return write_dataset(ds, path, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path) -> DensityResult:
        """Read a file written by :meth:`save` (also by sharpscope 0.1)."""
        ds, meta = read_dataset(path, cls.KIND)
        with damaged_result_file(path, cls.KIND):
            run = ds["node_run"].values
            pick = [run == r for r in range(int(meta["n_runs"]))]
            return cls(nodes=[ds["node_value"].values[p] for p in pick],
                       weights=[ds["node_weight"].values[p] for p in pick],
                       residuals=[ds["node_residual"].values[p] for p in pick],
                       grid=ds["grid"].values, density=ds["density"].values, sigma=float(meta["sigma"]),
                       n_hvp=int(meta["n_hvp"]), settings=dict(meta["settings"]))


def smoothed_density(nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], grid: np.ndarray,
                     sigma: float) -> np.ndarray:
    """``mean_runs sum_i w_i N(grid; node_i, sigma^2)``."""
    sigma = number(sigma, "sigma", minimum=0.0, strict_minimum=True)
    total = np.zeros_like(grid, dtype=np.float64)
    for n, w in zip(nodes, weights):
        z = (grid[:, None] - n[None, :]) / sigma
        total += (np.exp(-0.5 * z**2) * w[None, :]).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return total / len(nodes)


def _density_grid(nodes: Sequence[np.ndarray], sigma: float | None,
                  grid: int | np.ndarray) -> tuple[np.ndarray, float]:
    lo = float(min(n.min() for n in nodes))
    hi = float(max(n.max() for n in nodes))
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    if sigma is None:
        sigma = 0.01 * span
    sigma = number(sigma, "sigma (a width in eigenvalue units, or None)", minimum=0.0, strict_minimum=True)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = integer(grid, "grid (a number of points, or an array of eigenvalues)", minimum=2)
        values = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid)
    else:
        values = np.asarray(grid, dtype=np.float64)
        if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
            raise UserInputError("grid must be a 1-D array of at least two finite eigenvalues, or a number of "
                                 "points")
    return values, float(sigma)


def _check_n_iter(n_iter: Any, dim: int) -> int:
    """Lanczos steps per SLQ run: at most the Hessian's side ``dim`` and at most :data:`MAX_SLQ_STEPS`."""
    n_iter = positive_int(n_iter, "n_iter")
    if n_iter > dim:
        raise UserInputError(f"n_iter={n_iter} is larger than the size of the Hessian ({dim} parameters): Lanczos "
                             f"has at most {dim} distinct nodes; use n_iter <= {dim} (80-100 is typical)")
    if n_iter > MAX_SLQ_STEPS:
        raise UserInputError(f"n_iter={n_iter} is above the cap of {MAX_SLQ_STEPS} Lanczos steps per run (the cost "
                             "grows like n_iter^2 * dim); 80-100 steps resolve the density: use a smaller n_iter "
                             "and more n_runs")
    return n_iter


@analysis_threads
def hessian_density(model: nn.Module, loss_fn: LossFn, data: Any, n_iter: int = 80, n_runs: int = 1,
                    sigma: float | None = None, grid: int | np.ndarray = 1000, seed: int = 0,
                    backend: str = "sharpscope", params: Iterable[torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, hvp: str = "auto", progress: bool = True,
                    distributed: bool | None = None, split: str = "data",
                    curvature: str = "hessian") -> DensityResult:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (``n_runs * n_iter`` HVPs).

    Args:
        n_iter: Lanczos steps per run (nodes per run; moments up to ``2 n_iter - 1`` are exact per probe);
            at most the number of parameters and at most :data:`MAX_SLQ_STEPS` (refused otherwise).
        n_runs: number of Rademacher probes (the variance of the moments falls like ``1 / n_runs``).
        sigma: Gaussian width in eigenvalue units; default 1 % of the range of the nodes.
        grid: number of grid points over the range of the nodes (+-5 sigma), or the grid itself.
        backend: ``"pyhessian"`` runs PyHessian's ``density`` (with ``torch.eig`` replaced by ``eigh``).
        distributed, split: as in :func:`hessian_trace`; ``split="probes"`` runs probe ``r`` on rank
            ``r mod N`` (every rank draws all probes from the same seed) and gathers the runs in order.
        curvature: ``"hessian"`` (default) or ``"ggn"`` (the Gauss-Newton matrix, as in
            :func:`hessian_eigenvalues`; its density lies on ``[0, inf)``).
    """
    _check_backend(backend)
    data_parallel, probes = _parallel_mode(distributed, split)
    n_runs = positive_int(n_runs, "n_runs")
    seed = integer(seed, "seed", minimum=None)
    curvature = _check_curvature(curvature, model, loss_fn, backend, hvp)
    if backend == "pyhessian":
        _pyhessian_options(params, dtype)
    batches = prepared_batches(model, loss_fn, data)
    n_iter = _check_n_iter(n_iter, _dimension(model, params))
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_density

        return pyhessian_density(model, loss_fn, batches, n_iter=n_iter, n_runs=n_runs, sigma=sigma, grid=grid,
                                 seed=seed, progress=progress)
    start = time.perf_counter()
    with _operator(curvature, model, loss_fn, batches, params=params, dtype=dtype, hvp=hvp,
                   distributed=data_parallel) as op:
        runs = _slq_runs(op, n_iter, n_runs, _generator(seed), main_progress(progress), probes)
        settings = _base_settings(model, seed, backend, op, split, probes)
        n_hvp = sum_int(op.n_hvp, probes)
    nodes = [r.nodes for r in runs]
    weights = [r.weights for r in runs]
    values, sigma = _density_grid(nodes, sigma, grid)
    settings.update({"n_iter": n_iter, "n_runs": n_runs, "seconds": time.perf_counter() - start})
    return DensityResult(nodes=nodes, weights=weights, residuals=[r.residuals for r in runs], grid=values,
                         density=smoothed_density(nodes, weights, values, sigma), sigma=sigma, n_hvp=n_hvp,
                         settings=settings)


def _slq_runs(op: HessianOperator, n_iter: int, n_runs: int, gen: torch.Generator,
              progress: bool, probes: bool = False) -> list[Any]:
    """``n_runs`` Lanczos quadratures from normalised Rademacher probes (with ``probes``: run ``r`` on rank
    ``r mod N``, every rank drawing every probe so that run ``r`` uses the probe one process would)."""
    mine = set(my_indices(n_runs, probes))
    bar = _HvpProgress(progress, len(mine) * min(n_iter, op.dim), "SLQ")
    runs = {}
    try:
        for r in range(n_runs):
            probe = _rademacher((op.dim,), gen, op)
            if r in mine:
                runs[r] = lanczos_quadrature(lambda u: _tick(op.matvec(u), bar, op), probe, n_iter)
    finally:
        bar.close()
    return gather_in_order(runs, n_runs, probes)


def _tick(out: torch.Tensor, bar: _HvpProgress, op: HessianOperator) -> torch.Tensor:
    bar.step(op.n_hvp)
    return out


# ---------------------------------------------------------------------------------------------------
# Per-layer curvature
# ---------------------------------------------------------------------------------------------------
LAYER_KIND = "layer_curvature"


class LayerCurvatureResult(TableResult):
    """Per parameter tensor: top eigenvalue and trace of its diagonal Hessian block (:func:`layer_curvature`).

    One row per tensor: ``layer, shape, numel, top_eigenvalue, top_error_bound, top_converged, trace,
    trace_stderr, trace_method, n_hvp``. It reads like that table (``res["trace"]``, ``len(res)``,
    ``res.loc[...]``, ``res.attrs["settings"]``), as the DataFrame returned by sharpscope 0.1 did; the file
    format is the one of 0.1's ``save_layer_curvature``.
    """

    KIND = LAYER_KIND

    def __init__(self, table: pd.DataFrame, settings: dict[str, Any]) -> None:
        super().__init__(table, settings)
        if "top_converged" in self.table.columns:  # netCDF stores booleans as integers
            self.table["top_converged"] = self.table["top_converged"].astype(bool)
        self.table.attrs["settings"] = self.settings

    @classmethod
    def load(cls, path: str | Path) -> LayerCurvatureResult:
        """Read a file written by :meth:`save` or by sharpscope 0.1's ``save_layer_curvature``."""
        with damaged_result_file(path, cls.KIND):
            return super().load(path)


def _selected_tensors(model: nn.Module, layers: Callable[[str, torch.Tensor], bool] | None
                      ) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (layers is None or layers(n, p))]
    if not named:
        raise UserInputError("no trainable parameter tensor selected (check requires_grad and the layers filter)")
    return named


def _block_curvature(op: HessianOperator, name: str, shape: torch.Size, seed: int, tol: float, max_iter: int,
                     n_trace_samples: int) -> dict[str, Any]:
    """One row of :func:`layer_curvature` for the block the operator ``op`` is restricted to."""
    eig = thick_restart_lanczos(op.matvec, _gaussian(op.dim, _generator(seed), op), k=1, tol=tol,
                                max_matvec=max_iter, seed=seed)
    if op.dim <= n_trace_samples:  # exact: sum_j e_j^T H e_j
        eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
        trace = float(sum(_hutchinson_samples(op, eye, _HvpProgress(False, 0, ""), False).tolist()))
        stderr, method = 0.0, "exact"
    else:
        tr = trace_estimate(op, n_trace_samples, "hutch++", seed)
        trace, stderr, method = tr.estimate, tr.stderr, tr.method
    return {"layer": name, "shape": "x".join(map(str, shape)) or "scalar", "numel": op.dim,
            "top_eigenvalue": float(eig.values[0]), "top_error_bound": float(eig.error_bounds[0]),
            "top_converged": eig.converged, "trace": trace, "trace_stderr": stderr,
            "trace_method": method, "n_hvp": op.n_hvp}


@analysis_threads
def layer_curvature(model: nn.Module, loss_fn: LossFn, data: Any, tol: float = 1e-3, max_iter: int = 100,
                    n_trace_samples: int = 30, seed: int = 0, dtype: torch.dtype | None = None,
                    hvp: str = "auto", layers: Callable[[str, torch.Tensor], bool] | None = None,
                    progress: bool = True, distributed: bool | None = None,
                    curvature: str = "hessian") -> LayerCurvatureResult:
    """Top eigenvalue and trace of each diagonal block ``H_tt`` of the Hessian (one per parameter tensor).

    The block of tensor ``t`` is the Hessian of the loss w.r.t. ``t`` alone, the other tensors held fixed.
    Its top eigenvalue comes from Lanczos (to ``tol``); its trace is exact (one HVP per basis vector)
    when the tensor has at most ``n_trace_samples`` elements and a Hutch++ estimate with that budget
    otherwise. ``layers(name, param) -> bool`` selects tensors (default: every trainable one).

    Returns a :class:`LayerCurvatureResult`, one row per tensor: ``layer, shape, numel, top_eigenvalue,
    top_error_bound, top_converged, trace, trace_stderr, trace_method, n_hvp``; it reads like that
    DataFrame, with the settings in ``.settings`` (and ``.attrs["settings"]``). ``distributed``: every
    block's products are data-parallel as in :func:`hessian_eigenvalues`. ``curvature="ggn"``: the
    diagonal blocks ``G_tt = J_t^T H_loss J_t`` of the Gauss-Newton matrix instead.
    """
    max_iter = positive_int(max_iter, "max_iter")
    n_trace_samples = integer(n_trace_samples, "n_trace_samples", minimum=4)
    tol = number(tol, "tol (a relative tolerance)", minimum=0.0, maximum=1.0, strict_minimum=True)
    seed = integer(seed, "seed", minimum=None)
    curvature = _check_curvature(curvature, model, loss_fn, hvp=hvp)
    batches = prepared_batches(model, loss_fn, data)  # materialised once, not once per layer
    named = _selected_tensors(model, layers)
    start = time.perf_counter()
    fingerprint = model_fingerprint(model)
    rows = []
    active = use_ranks(distributed)
    for i, (name, p) in enumerate(progress_bar(named, enabled=main_progress(progress), desc="layers",
                                               total=len(named))):
        with _operator(curvature, model, loss_fn, batches, params=[p], dtype=dtype, hvp=hvp,
                       distributed=active) as op:
            rows.append(_block_curvature(op, name, p.shape, seed + i, tol, max_iter, n_trace_samples))
            data_settings = _data_settings(op)
            if curvature == "hessian" and hvp == "auto":
                hvp = op.method  # "auto" times the methods on the first block, not again on every block
    data_settings.pop("dim", None)
    settings = {"seed": seed, "tol": tol, "max_iter": max_iter, "n_trace_samples": n_trace_samples,
                "model_fingerprint": fingerprint, "seconds": time.perf_counter() - start, **data_settings,
                "provenance": provenance()}
    result = LayerCurvatureResult(pd.DataFrame(rows), settings)
    if not result.table["top_converged"].all():
        warnings.warn("the top eigenvalue of some blocks did not converge: "
                      f"{list(result.table.loc[~result.table['top_converged'], 'layer'])}; raise max_iter",
                      RuntimeWarning, stacklevel=2)
    return result


def save_layer_curvature(df: LayerCurvatureResult | pd.DataFrame, path: str | Path) -> Path:
    """Alias of :meth:`LayerCurvatureResult.save` (a 0.1-style DataFrame takes its settings from ``attrs``)."""
    if not isinstance(df, LayerCurvatureResult):
        df = LayerCurvatureResult(df, df.attrs.get("settings", {}))
    return df.save(path)


def load_layer_curvature(path: str | Path) -> LayerCurvatureResult:
    """Alias of :meth:`LayerCurvatureResult.load`; the result reads like the 0.1 DataFrame."""
    return LayerCurvatureResult.load(path)
