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
  ``tr((I - QQ^T) H (I - QQ^T))``. Its error falls like ``1/m`` instead of ``1/sqrt(m)``.
* :func:`hessian_density` -- stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Ubaru et al.
  2017): for a normalised Rademacher probe ``v``, ``n_iter`` Lanczos steps give nodes ``theta_i`` and
  weights ``w_i`` with ``sum_i w_i theta_i^j = v^T H^j v`` for ``j < 2 n_iter``, whose mean over probes is
  ``tr(H^j) / dim``; the density is ``mean_runs sum_i w_i N(x; theta_i, sigma^2)``.
* :func:`layer_curvature` -- the same on each diagonal block ``H_tt`` (one parameter tensor ``t``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .._progress import progress as progress_bar
from .batching import as_batches
from .curvature import HessianOperator, LossFn
from .lanczos import _error_bounds, krylov_basis, lanczos_quadrature, thick_restart_lanczos
from .results import model_fingerprint, read_dataset, read_table, write_dataset, write_table

BACKENDS = ("sharpscope", "pyhessian")
TRACE_METHODS = ("hutch++", "hutchinson", "krylov")


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------
def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _pyhessian_options(params: Any, dtype: Any) -> None:
    if params is not None or dtype is not None:
        raise ValueError("backend='pyhessian' works on all trainable parameters in the model's dtype; "
                         "drop params=/dtype= or use backend='sharpscope'")


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _data_settings(op: HessianOperator) -> dict[str, Any]:
    return {"n_examples": int(sum(len(x) for x, _ in op.batches)), "n_batches": len(op.batches),
            "dim": op.dim, "dtype": str(op.dtype).replace("torch.", ""), "hvp": op.method,
            "device": str(op.device)}


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


def _base_settings(model: nn.Module, seed: int, backend: str, op: HessianOperator | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": int(seed), "backend": backend, "model_fingerprint": model_fingerprint(model)}
    if op is not None:
        settings.update(_data_settings(op))
    return settings


# ---------------------------------------------------------------------------------------------------
# Top-k eigenvalues
# ---------------------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Extreme Hessian eigenpairs.

    Attributes:
        eigenvalues: wanted end first -- descending for ``which="LA"``, ascending (most negative first)
            for ``which="SA"``.
        eigenvectors: ``(dim, k)`` unit vectors in the flat parameter order of ``param_names`` (or None).
        residuals: ``||H v - lambda v|| / |lambda|`` of each pair.
        error_bounds: bound on ``|lambda_true - lambda|`` (absolute; see :mod:`~sharpscope.analysis.lanczos`).
        n_hvp: full-data Hessian-vector products used.
        converged: every pair met ``tol``.
        settings: which, k, tol, max_iter, seed, backend, data and model identity, wall time.
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
            raise ValueError("this result was computed or saved without eigenvectors")
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
        ds, meta = read_dataset(path, cls.KIND)
        vecs = ds["eigenvector"].values if "eigenvector" in ds else None
        return cls(eigenvalues=ds["eigenvalue"].values, eigenvectors=vecs, residuals=ds["residual"].values,
                   error_bounds=ds["error_bound"].values, n_hvp=int(meta["n_hvp"]),
                   converged=bool(meta["converged"]), settings=meta["settings"],
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


def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Any, k: int = 1, which: str = "LA",
                        tol: float = 1e-3, max_iter: int = 100, seed: int = 0, backend: str = "sharpscope",
                        params: Iterable[torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                        hvp: str = "auto", max_basis: int | None = None, eigenvectors: bool = True,
                        progress: bool = True) -> EigenResult:
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
        progress: show a progress bar.

    Warns (``RuntimeWarning``) when the largest-magnitude eigenvalue is negative, and when not converged.
    """
    _check_backend(backend)
    k = _check_positive_int(k, "k")
    max_iter = _check_positive_int(max_iter, "max_iter")
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' (largest) or 'SA' (most negative), got {which!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a relative tolerance in (0, 1), got {tol!r}")
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_eigenvalues

        _pyhessian_options(params, dtype)
        if which != "LA":
            raise ValueError("backend='pyhessian' computes only the top eigenvalues (which='LA')")
        return pyhessian_eigenvalues(model, loss_fn, data, k=k, tol=tol, max_iter=max_iter, seed=seed,
                                     progress=progress)
    start = time.perf_counter()
    with HessianOperator(model, loss_fn, data, params=params, dtype=dtype, hvp=hvp) as op:
        if k > op.dim:
            raise ValueError(f"k={k} is larger than the number of parameters ({op.dim})")
        bar = _HvpProgress(progress, max_iter, f"Lanczos top-{k} ({which})")
        try:
            out = thick_restart_lanczos(op.matvec, _gaussian(op.dim, _generator(seed), op), k=k, which=which,
                                        tol=tol, max_matvec=max_iter, max_basis=max_basis, seed=seed,
                                        on_step=bar.step)
        finally:
            bar.close()
        settings = _base_settings(model, seed, backend, op)
        settings.update({"k": k, "which": which, "tol": tol, "max_iter": max_iter,
                         "max_basis": max_basis, "seconds": time.perf_counter() - start})
        result = EigenResult(
            eigenvalues=np.asarray(out.values, dtype=np.float64),
            eigenvectors=out.vectors.detach().cpu().numpy() if eigenvectors else None,
            residuals=_relative(out.residuals, out.values), error_bounds=np.asarray(out.error_bounds),
            n_hvp=op.n_hvp, converged=out.converged, settings=settings, param_names=list(op.param_names),
            shapes=[tuple(s) for s in op.shapes])
    if which == "LA":
        _warn_negative_dominant(out.ritz_values, float(out.values[0]))
    if not out.converged:
        warnings.warn(f"Lanczos did not reach tol={tol} within max_iter={max_iter} Hessian-vector products "
                      f"(relative error bounds {result.error_bounds / np.abs(result.eigenvalues)}); "
                      "raise max_iter", RuntimeWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------------
@dataclass
class TraceResult:
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
        ds = xr.Dataset({"sample": ("probe", np.asarray(self.samples, dtype=np.float64))})
        meta = {"estimate": self.estimate, "stderr": self.stderr, "n_hvp": self.n_hvp, "method": self.method,
                "exact_part": self.exact_part, "settings": self.settings}
        return write_dataset(ds, path, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        ds, meta = read_dataset(path, cls.KIND)
        return cls(estimate=float(meta["estimate"]), stderr=float(meta["stderr"]), n_hvp=int(meta["n_hvp"]),
                   method=str(meta["method"]), samples=ds["sample"].values,
                   exact_part=float(meta["exact_part"]), settings=meta["settings"])


def _hutchinson_samples(op: HessianOperator, Z: torch.Tensor, bar: _HvpProgress) -> np.ndarray:
    out = []
    for i in range(Z.shape[1]):
        z = Z[:, i]
        out.append(float(torch.dot(z, op.matvec(z))))
        bar.step(op.n_hvp)
    return np.asarray(out, dtype=np.float64)


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def trace_estimate(op: HessianOperator, n_samples: int, method: str = "hutch++", seed: int = 0,
                   progress: bool = False) -> TraceResult:
    """Trace of the operator's Hessian with ``n_samples`` Hessian-vector products (see :func:`hessian_trace`)."""
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    minimum = 2 if method == "hutchinson" else 4
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < minimum:
        raise ValueError(f"n_samples must be an integer >= {minimum} for method={method!r} (a standard error "
                         f"needs at least two Hutchinson samples), got {n_samples!r}")
    gen = _generator(seed)
    start = op.n_hvp
    bar = _HvpProgress(progress, n_samples, f"trace ({method})", offset=start)
    try:
        if method == "hutchinson":
            samples = _hutchinson_samples(op, _rademacher((op.dim, n_samples), gen, op), bar)
            return TraceResult(estimate=float(samples.mean()), stderr=_stderr(samples), n_hvp=op.n_hvp - start,
                               method=method, samples=samples)
        if method == "krylov":
            V, T, _ = krylov_basis(lambda u: _tick(op.matvec(u), bar, op), _rademacher((op.dim,), gen, op),
                                   n_samples // 2)
            exact = float(np.trace(T))
            if V.shape[0] >= op.dim:
                return TraceResult(estimate=exact, stderr=0.0, n_hvp=op.n_hvp - start, method="exact",
                                   samples=np.zeros(0), exact_part=exact)
            G = _rademacher((op.dim, n_samples - V.shape[0]), gen, op)
            G = G - V.T @ (V @ G)
            samples = _hutchinson_samples(op, G, bar)
            return TraceResult(estimate=exact + float(samples.mean()), stderr=_stderr(samples),
                               n_hvp=op.n_hvp - start, method=method, samples=samples, exact_part=exact)
        n_sketch = n_samples // 3
        n_rest = n_samples - 2 * n_sketch
        S = _rademacher((op.dim, min(n_sketch, op.dim)), gen, op)
        Y = torch.stack([op.matvec(S[:, i]) for i in range(S.shape[1])], dim=1)
        bar.step(op.n_hvp)
        Q, _ = torch.linalg.qr(Y)
        exact = 0.0
        for i in range(Q.shape[1]):
            exact += float(torch.dot(Q[:, i], op.matvec(Q[:, i])))
            bar.step(op.n_hvp)
        if Q.shape[1] >= op.dim:  # the sketch spans the space: the trace is exact
            return TraceResult(estimate=exact, stderr=0.0, n_hvp=op.n_hvp - start, method="exact",
                               samples=np.zeros(0), exact_part=exact)
        G = _rademacher((op.dim, n_rest), gen, op)
        G = G - Q @ (Q.T @ G)
        samples = _hutchinson_samples(op, G, bar)
        return TraceResult(estimate=exact + float(samples.mean()), stderr=_stderr(samples),
                           n_hvp=op.n_hvp - start, method=method, samples=samples, exact_part=exact)
    finally:
        bar.close()


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, n_samples: int = 60, method: str = "hutch++",
                  seed: int = 0, backend: str = "sharpscope", params: Iterable[torch.Tensor] | None = None,
                  dtype: torch.dtype | None = None, hvp: str = "auto", tol: float = 1e-3,
                  progress: bool = True) -> TraceResult:
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
    """
    _check_backend(backend)
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_trace

        _pyhessian_options(params, dtype)
        return pyhessian_trace(model, loss_fn, data, max_iter=n_samples, tol=tol, seed=seed, progress=progress)
    start = time.perf_counter()
    with HessianOperator(model, loss_fn, data, params=params, dtype=dtype, hvp=hvp) as op:
        result = trace_estimate(op, n_samples, method, seed, progress)
        result.settings = _base_settings(model, seed, backend, op)
    result.settings.update({"n_samples": n_samples, "method": method, "seconds": time.perf_counter() - start})
    return result


# ---------------------------------------------------------------------------------------------------
# Spectral density
# ---------------------------------------------------------------------------------------------------
@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature of the Hessian spectrum.

    Attributes:
        nodes, weights: one array per run (Ritz values and Gauss weights, weights summing to 1).
        residuals: Ritz residual of every node (small for converged extreme nodes).
        grid, density: the smoothed density ``mean_runs sum_i w_i N(x; node_i, sigma^2)`` on ``grid``
            (integrates to 1).
        sigma: the Gaussian width.
        n_hvp: Hessian-vector products used.
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
            raise ValueError(f"no run has {k} nodes; use n_iter >= {k}")
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
        ds, meta = read_dataset(path, cls.KIND)
        run = ds["node_run"].values
        pick = [run == r for r in range(int(meta["n_runs"]))]
        return cls(nodes=[ds["node_value"].values[p] for p in pick],
                   weights=[ds["node_weight"].values[p] for p in pick],
                   residuals=[ds["node_residual"].values[p] for p in pick],
                   grid=ds["grid"].values, density=ds["density"].values, sigma=float(meta["sigma"]),
                   n_hvp=int(meta["n_hvp"]), settings=meta["settings"])


def smoothed_density(nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], grid: np.ndarray,
                     sigma: float) -> np.ndarray:
    """``mean_runs sum_i w_i N(grid; node_i, sigma^2)``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
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
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive width (in eigenvalue units) or None, got {sigma!r}")
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if grid < 2:
            raise ValueError(f"grid must be a number of points >= 2 or an array of eigenvalues, got {grid}")
        values = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid))
    else:
        values = np.asarray(grid, dtype=np.float64)
        if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
            raise ValueError("grid must be a 1-D array of at least two finite eigenvalues, or a number of points")
    return values, float(sigma)


def hessian_density(model: nn.Module, loss_fn: LossFn, data: Any, n_iter: int = 80, n_runs: int = 1,
                    sigma: float | None = None, grid: int | np.ndarray = 1000, seed: int = 0,
                    backend: str = "sharpscope", params: Iterable[torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, hvp: str = "auto", progress: bool = True) -> DensityResult:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (``n_runs * n_iter`` HVPs).

    Args:
        n_iter: Lanczos steps per run (nodes per run; moments up to ``2 n_iter - 1`` are exact per probe).
        n_runs: number of Rademacher probes (the variance of the moments falls like ``1 / n_runs``).
        sigma: Gaussian width in eigenvalue units; default 1 % of the range of the nodes.
        grid: number of grid points over the range of the nodes (+-5 sigma), or the grid itself.
        backend: ``"pyhessian"`` runs PyHessian's ``density`` (with ``torch.eig`` replaced by ``eigh``).
    """
    _check_backend(backend)
    n_iter = _check_positive_int(n_iter, "n_iter")
    n_runs = _check_positive_int(n_runs, "n_runs")
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_density

        _pyhessian_options(params, dtype)
        return pyhessian_density(model, loss_fn, data, n_iter=n_iter, n_runs=n_runs, sigma=sigma, grid=grid,
                                 seed=seed, progress=progress)
    start = time.perf_counter()
    gen = _generator(seed)
    with HessianOperator(model, loss_fn, data, params=params, dtype=dtype, hvp=hvp) as op:
        bar = _HvpProgress(progress, n_runs * min(n_iter, op.dim), "SLQ")
        runs = []
        try:
            for _ in range(n_runs):
                v = _rademacher((op.dim,), gen, op)
                runs.append(lanczos_quadrature(lambda u: _tick(op.matvec(u), bar, op), v, n_iter))
        finally:
            bar.close()
        settings = _base_settings(model, seed, backend, op)
        n_hvp = op.n_hvp
    nodes = [r.nodes for r in runs]
    weights = [r.weights for r in runs]
    values, sigma = _density_grid(nodes, sigma, grid)
    settings.update({"n_iter": n_iter, "n_runs": n_runs, "seconds": time.perf_counter() - start})
    return DensityResult(nodes=nodes, weights=weights, residuals=[r.residuals for r in runs], grid=values,
                         density=smoothed_density(nodes, weights, values, sigma), sigma=sigma, n_hvp=n_hvp,
                         settings=settings)


def _tick(out: torch.Tensor, bar: _HvpProgress, op: HessianOperator) -> torch.Tensor:
    bar.step(op.n_hvp)
    return out


# ---------------------------------------------------------------------------------------------------
# Per-layer curvature
# ---------------------------------------------------------------------------------------------------
LAYER_KIND = "layer_curvature"


def layer_curvature(model: nn.Module, loss_fn: LossFn, data: Any, tol: float = 1e-3, max_iter: int = 100,
                    n_trace_samples: int = 30, seed: int = 0, dtype: torch.dtype | None = None,
                    hvp: str = "auto", layers: Callable[[str, torch.Tensor], bool] | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Top eigenvalue and trace of each diagonal block ``H_tt`` of the Hessian (one per parameter tensor).

    The block of tensor ``t`` is the Hessian of the loss w.r.t. ``t`` alone, the other tensors held fixed.
    Its top eigenvalue comes from Lanczos (to ``tol``); its trace is exact (one HVP per basis vector)
    when the tensor has at most ``n_trace_samples`` elements and a Hutch++ estimate with that budget
    otherwise. ``layers(name, param) -> bool`` selects tensors (default: every trainable one).

    Returns a DataFrame, one row per tensor: ``layer, shape, numel, top_eigenvalue, top_error_bound,
    top_converged, trace, trace_stderr, trace_method, n_hvp``; the settings are in ``df.attrs``.
    Save and load it with :func:`save_layer_curvature` / :func:`load_layer_curvature`.
    """
    max_iter = _check_positive_int(max_iter, "max_iter")
    n_trace_samples = _check_positive_int(n_trace_samples, "n_trace_samples", 4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (layers is None or layers(n, p))]
    if not named:
        raise ValueError("no trainable parameter tensor selected (check requires_grad and the layers filter)")
    start = time.perf_counter()
    rows = []
    fingerprint = model_fingerprint(model)
    batches = as_batches(data)  # materialised once, not once per layer
    for i, (name, p) in enumerate(progress_bar(named, enabled=progress, desc="layers", total=len(named))):
        with HessianOperator(model, loss_fn, batches, params=[p], dtype=dtype, hvp=hvp) as op:
            eig = thick_restart_lanczos(op.matvec, _gaussian(op.dim, _generator(seed + i), op), k=1, tol=tol,
                                        max_matvec=max_iter, seed=seed)
            if op.dim <= n_trace_samples:
                eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
                trace, stderr, method = float(sum(op.matvec(e)[j] for j, e in enumerate(eye))), 0.0, "exact"
            else:
                tr = trace_estimate(op, n_trace_samples, "hutch++", seed + i)
                trace, stderr, method = tr.estimate, tr.stderr, tr.method
            rows.append({"layer": name, "shape": "x".join(map(str, p.shape)) or "scalar", "numel": op.dim,
                         "top_eigenvalue": float(eig.values[0]), "top_error_bound": float(eig.error_bounds[0]),
                         "top_converged": eig.converged, "trace": trace, "trace_stderr": stderr,
                         "trace_method": method, "n_hvp": op.n_hvp})
            data_settings = _data_settings(op)
    df = pd.DataFrame(rows)
    settings = {"seed": int(seed), "tol": tol, "max_iter": max_iter, "n_trace_samples": n_trace_samples,
                "model_fingerprint": fingerprint, "seconds": time.perf_counter() - start, **data_settings}
    settings.pop("dim", None)
    df.attrs["settings"] = settings
    if not df["top_converged"].all():
        warnings.warn("the top eigenvalue of some blocks did not converge: "
                      f"{list(df.loc[~df['top_converged'], 'layer'])}; raise max_iter", RuntimeWarning, stacklevel=2)
    return df


def save_layer_curvature(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table of :func:`layer_curvature` (settings from ``df.attrs``) as a result file."""
    return write_table(df, path, LAYER_KIND, {"settings": df.attrs.get("settings", {})})


def load_layer_curvature(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`save_layer_curvature`; the settings come back in ``df.attrs``."""
    df, meta = read_table(path, LAYER_KIND)
    df["top_converged"] = df["top_converged"].astype(bool)
    df.attrs["settings"] = meta.get("settings", {})
    return df
