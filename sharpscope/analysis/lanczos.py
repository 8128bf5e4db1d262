"""Lanczos iterations for a symmetric operator given only by its matrix-vector product.

Two algorithms on the same expansion step (Lanczos with full reorthogonalisation, i.e. symmetric
Arnoldi: each new vector is orthogonalised twice against the whole basis, "twice is enough",
Giraud et al. 2005, so the basis stays orthonormal to working precision and no ghost eigenvalues
appear):

* :func:`thick_restart_lanczos` -- extreme eigenpairs (Wu & Simon 2000, "Thick-restart Lanczos
  method for large symmetric eigenvalue problems"). After ``j`` steps the projected matrix
  ``T = V^T H V`` gives Ritz pairs ``(theta_i, y_i = V s_i)`` with residual
  ``||H y_i - theta_i y_i|| = beta_j |s_{j,i}|`` at no extra cost, so convergence is checked after every
  product. When the basis is full it is restarted with the wanted Ritz vectors kept (the restart keeps
  the Krylov information instead of throwing it away as an explicit restart does).
* :func:`lanczos_quadrature` -- plain ``n``-step Lanczos from a given start vector, returning the nodes
  (Ritz values) and Gauss-quadrature weights ``s_{0,i}^2`` of stochastic Lanczos quadrature
  (Golub & Meurant 2010; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).

Convergence test for an eigenvalue: with residual ``r_i`` and gap ``delta_i`` to the rest of the
spectrum, ``|lambda - theta_i| <= min(r_i, r_i^2 / delta_i)`` (Parlett, "The Symmetric Eigenvalue
Problem", Thm 11.7.1 / Kato-Temple). ``delta_i`` is estimated from the other Ritz values, each widened by
its own residual, ``delta_i = min_l (|theta_i - theta_l| - r_l)``; when that is not positive the plain
bound ``r_i`` is used. A pair is converged when this bound is at most ``tol * |theta_i|``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserInputError

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosEigen:
    """Outcome of :func:`thick_restart_lanczos` (values in the wanted order: LA descending, SA ascending)."""

    values: np.ndarray
    vectors: torch.Tensor  # (dim, k), orthonormal columns
    residuals: np.ndarray  # ||H y - theta y||, absolute
    error_bounds: np.ndarray  # bound on |lambda - theta|
    ritz_values: np.ndarray  # every Ritz value of the last projected matrix (for spectrum-wide checks)
    n_matvec: int
    converged: bool


@dataclass
class LanczosQuadrature:
    """Nodes and weights of one SLQ run; ``residuals`` are the Ritz residuals of the nodes."""

    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    n_matvec: int


class _Basis:
    """An orthonormal Krylov basis stored row-wise, and the projected matrix ``T = V^T H V``."""

    def __init__(self, dim: int, size: int, like: torch.Tensor) -> None:
        self.V = torch.empty((size + 1, dim), dtype=like.dtype, device=like.device)
        self.T = np.zeros((size + 1, size + 1))
        self.n = 0

    def orthogonalise(self, w: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Remove the components of ``w`` in the basis (two passes); return ``w`` and the coefficients."""
        Vn = self.V[: self.n]
        h = Vn @ w
        w = w - Vn.T @ h
        h2 = Vn @ w
        w = w - Vn.T @ h2
        return w, (h + h2).double().cpu().numpy()

    def append(self, v: torch.Tensor) -> None:
        self.V[self.n] = v
        self.n += 1

    def expand(self, matvec: Matvec) -> tuple[torch.Tensor, float]:
        """One Lanczos step on the newest vector: fill its column of ``T``, return (w, ||w||)."""
        j = self.n - 1
        w, h = self.orthogonalise(matvec(self.V[j]))
        self.T[: self.n, j] = h
        self.T[j, : self.n] = h
        return w, float(torch.linalg.vector_norm(w))

    def random_orthogonal(self, generator: torch.Generator) -> torch.Tensor | None:
        """A random unit vector orthogonal to the basis (None when the basis spans everything)."""
        dim = self.V.shape[1]
        if self.n >= dim:
            return None
        for _ in range(3):
            w = torch.randn(dim, generator=generator, dtype=torch.float64).to(self.V)
            w, _ = self.orthogonalise(w)
            norm = float(torch.linalg.vector_norm(w))
            if norm > 1e-6:
                return w / norm
        return None


def _error_bounds(theta: np.ndarray, res: np.ndarray) -> np.ndarray:
    bounds = res.copy()
    for i in range(len(theta)):
        others = np.delete(np.arange(len(theta)), i)
        if len(others) == 0:
            continue
        gap = np.min(np.abs(theta[i] - theta[others]) - res[others])
        if gap > 0:
            bounds[i] = min(res[i], res[i] ** 2 / gap)
    return bounds


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(theta)
    return order[::-1][:k] if which == "LA" else order[:k]


@dataclass
class _RitzStep:
    """The Ritz pairs of the current projection and what the convergence test needs."""

    theta: np.ndarray  # every Ritz value, ascending
    S: np.ndarray  # eigenvectors of the projected matrix (columns)
    res: np.ndarray  # Ritz residuals beta |s_{n,i}|
    bounds: np.ndarray  # error bounds (module docstring)
    want: np.ndarray  # indices of the wanted pairs, wanted end first
    worst: float  # worst relative bound of the wanted pairs (inf while fewer than k)
    invariant: bool  # the Krylov space is invariant: residuals vanish


def _ritz_step(basis: _Basis, beta: float, k: int, which: str) -> _RitzStep:
    n = basis.n
    theta, S = np.linalg.eigh(basis.T[:n, :n])
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    # An invariant subspace: the residuals vanish (relative to the operator's scale).
    invariant = beta <= 1e-10 * scale * max(1.0, np.sqrt(n))
    res = np.zeros(n) if invariant else beta * np.abs(S[-1, :])
    bounds = _error_bounds(theta, res)
    want = _wanted(theta, k, which)
    rel = bounds[want] / np.maximum(np.abs(theta[want]), 1e-6 * scale)
    worst = float(np.max(rel)) if n >= k else np.inf
    return _RitzStep(theta, S, res, bounds, want, worst, bool(invariant))


def _ritz_vectors(basis: _Basis, S: np.ndarray, columns: np.ndarray) -> torch.Tensor:
    """``(V^T S[:, columns])^T``: the Ritz vectors of the chosen pairs, one per row."""
    return torch.as_tensor(S[:, columns], dtype=basis.V.dtype, device=basis.V.device).T @ basis.V[: basis.n]


def _restart(basis: _Basis, step: _RitzStep, v_next: torch.Tensor, beta: float, k: int, m: int,
             which: str) -> None:
    """Thick restart: keep the ``p`` Ritz vectors nearest the wanted end, then continue from ``v_next``.

    The kept vectors diagonalise their block of ``T``; their coupling to ``v_next`` is
    ``beta * s_{n,i}`` (zero after an invariant subspace).
    """
    p = min(max(k + (m - k) // 2, k), m - 1)
    keep = _wanted(step.theta, p, which)
    basis.V[:p] = _ritz_vectors(basis, step.S, keep)
    basis.V[p] = v_next
    basis.n = p + 1
    basis.T[:] = 0.0
    basis.T[np.arange(p), np.arange(p)] = step.theta[keep]
    coupling = 0.0 if step.invariant else beta * step.S[-1, keep]
    basis.T[:p, p] = coupling
    basis.T[p, :p] = coupling


def _lanczos_size(dim: int, k: int, which: str, max_basis: int | None) -> int:
    """The basis size before a restart (validating ``which``, ``k`` and ``max_basis``)."""
    if which not in ("LA", "SA"):
        raise UserInputError(f"which must be 'LA' (largest) or 'SA' (smallest), got {which!r}")
    if not 1 <= k <= dim:
        raise UserInputError(f"k must be between 1 and the number of parameters ({dim}), got {k}")
    m = min(dim, max_basis if max_basis is not None else max(2 * k + 10, 20))
    if m < min(dim, k + 2):
        raise UserInputError(f"max_basis must be at least k + 2 = {k + 2}, got {max_basis}")
    return m


def thick_restart_lanczos(matvec: Matvec, v0: torch.Tensor, k: int = 1, which: str = "LA", tol: float = 1e-3,
                          max_matvec: int = 100, max_basis: int | None = None, seed: int = 0,
                          on_step: Callable[[int, float], None] | None = None) -> LanczosEigen:
    """The ``k`` largest (``which="LA"``) or smallest (``"SA"``) eigenpairs of a symmetric operator.

    Args:
        matvec: ``v -> H v`` on flat tensors.
        v0: start vector (any non-zero vector; its dtype and device are used throughout).
        k: number of eigenpairs; ``1 <= k <= dim``.
        which: ``"LA"`` (largest algebraic) or ``"SA"`` (smallest algebraic).
        tol: relative tolerance on the eigenvalue error bound (see the module docstring).
        max_matvec: at most this many products; ``converged`` is False if it runs out.
        max_basis: basis size before a thick restart (default ``max(2k + 10, 20)``, at most ``dim``).
        seed: seeds the random vectors needed when an invariant subspace is found early.
        on_step: called after each product with (products so far, worst relative bound).
    """
    dim = v0.numel()
    m = _lanczos_size(dim, k, which, max_basis)
    generator = torch.Generator().manual_seed(seed)
    basis = _Basis(dim, m, v0)
    norm0 = float(torch.linalg.vector_norm(v0))
    if not norm0 > 0:
        raise UserInputError("the start vector is zero")
    basis.append(v0 / norm0)
    n_mv = 0
    while True:
        w, beta = basis.expand(matvec)
        n_mv += 1
        step = _ritz_step(basis, beta, k, which)
        if on_step is not None:
            on_step(n_mv, step.worst)
        converged = basis.n >= k and step.worst <= tol
        # With an invariant subspace the search goes on from a random orthogonal vector, unless the
        # basis already spans the whole space (then every Ritz pair is exact).
        v_next = basis.random_orthogonal(generator) if step.invariant else w / beta
        if converged or n_mv >= max_matvec or v_next is None:
            want = step.want
            return LanczosEigen(values=step.theta[want], vectors=_ritz_vectors(basis, step.S, want).T.contiguous(),
                                residuals=step.res[want], error_bounds=step.bounds[want], ritz_values=step.theta,
                                n_matvec=n_mv, converged=bool(converged or (step.invariant and basis.n >= dim)))
        if basis.n < m:
            basis.append(v_next)
        else:
            _restart(basis, step, v_next, beta, k, m, which)


def lanczos_quadrature(matvec: Matvec, v0: torch.Tensor, n_iter: int) -> LanczosQuadrature:
    """``n_iter`` Lanczos steps from ``v0`` (normalised) with full reorthogonalisation.

    Returns the Gauss quadrature rule of the spectral measure ``mu = sum_i (u_i^T v)^2 delta_{lambda_i}``
    of ``v = v0 / ||v0||``: nodes ``theta_i`` (eigenvalues of the tridiagonal ``T``) and weights
    ``s_{0,i}^2`` (squared first components of its eigenvectors), exact for polynomials of degree
    ``< 2 n_iter``. Stops early, with an exact rule, if the Krylov space becomes invariant.
    """
    if n_iter < 1:
        raise UserInputError(f"n_iter must be at least 1, got {n_iter}")
    V, T, beta = krylov_basis(matvec, v0, n_iter)
    # Symmetric tridiagonal in exact arithmetic; the full projection is used (it is what was computed).
    theta, S = np.linalg.eigh(T)
    res = beta * np.abs(S[-1, :])
    return LanczosQuadrature(nodes=theta, weights=S[0, :] ** 2, residuals=res, n_matvec=V.shape[0])


def krylov_basis(matvec: Matvec, v0: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray, float]:
    """An orthonormal Krylov basis ``V`` (rows) of up to ``steps`` vectors from ``v0`` and ``T = V H V^T``.

    One product per basis vector; ``T`` holds the computed projections ``v_i^T H v_j``, so ``tr(T)`` is
    exactly ``sum_i v_i^T H v_i``. Stops early if the space becomes invariant. Also returns the norm of
    the last residual ``beta``.
    """
    dim = v0.numel()
    steps = min(steps, dim)
    basis = _Basis(dim, steps, v0)
    basis.append(v0 / torch.linalg.vector_norm(v0))
    while True:
        w, beta = basis.expand(matvec)
        scale = float(np.max(np.abs(np.diag(basis.T[: basis.n, : basis.n])))) + np.finfo(float).tiny
        if basis.n >= steps or beta <= 1e-10 * scale:
            break
        basis.append(w / beta)
    n = basis.n
    return basis.V[:n], basis.T[:n, :n].copy(), beta
