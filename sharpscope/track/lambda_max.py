"""``lambda_max``: the top Hessian eigenvalue of the probe loss, by Lanczos warm-started between events.

Between two tracking events the weights move a little, so the top eigenvector moves a little: Lanczos
started from the previous event's top Ritz vector ``u`` begins with ``theta_1 = u^T H u`` already close
to ``lambda_max`` (the Rayleigh quotient's error is quadratic in the vector's error), and converges in a
few products where a random start needs 6-8 at 1e-2 (Lanczos converges like ``exp(-2 j sqrt(gap))``
from the start vector's component). The reported ``residual`` is ``||H y - theta y|| / |theta|`` and
``error_bound`` the bound on ``|lambda - theta|`` of :mod:`sharpscope.analysis.lanczos`
(``min(r, r^2 / gap)``). Like every Krylov method, a warm start finds the eigenvalue the start vector
leans on: if a new, sharper direction appears that the old vector hardly touches, it can be missed
for a few events; ``cold_every`` restarts every so many events to catch it.

A cold start (the first event) begins from a seeded random vector. (Starting from the optimizer's
momentum, which lies mostly in the top few eigendirections, saved a product but on a ResNet-20 stopped at
the second eigenvalue, 15 % low, with a small Ritz-gap bound: the Krylov space hardly held the top one.)

One product is often enough: the warm vector ``u`` gives ``theta = u^T H u`` and the residual
``r = ||H u - theta u||`` from a single HVP, and with the gap ``g`` between the top two Ritz values of
the previous event (the estimate Lanczos's own test uses) the bound ``min(r, r^2 / delta)`` often meets
``tol`` already. The gap is carried over conservatively: ``delta = min(g, (g / theta_prev) |theta|) - r``
(relative to the new scale when the spectrum shrank, never larger than before, widened by ``r``), and for
at most :data:`GAP_EVENTS` events after the Lanczos run that measured it. Only
when the bound misses ``tol`` does Lanczos run, from ``u`` and reusing that first product, so nothing is
computed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._validate import integer, number
from ..analysis.lanczos import LanczosEigen, thick_restart_lanczos
from .measure import Event, Measure
from .rows import TrackRow
from .stability import base_optimizer, stability_threshold

#: Events a measured Ritz gap is reused for the one-product test before Lanczos measures it again.
GAP_EVENTS = 4


class WarmStartLanczos:
    """Top eigenpair of a symmetric operator, each run started from the previous run's top vector.

    Args:
        tol: relative accuracy of the eigenvalue (error bound / |theta|).
        max_hvp: most products per run.
        seed: seeds the random start of the first (and every cold) run.
        cold_every: start from a random vector every ``cold_every`` runs (None: only the first).
    """

    def __init__(self, tol: float = 1e-2, max_hvp: int = 50, seed: int = 0, cold_every: int | None = None) -> None:
        self.tol = number(tol, "tol (a relative accuracy)", minimum=0.0, maximum=1.0, strict_minimum=True)
        self.max_hvp = integer(max_hvp, "max_hvp", minimum=2)
        self.seed = integer(seed, "seed", minimum=None)
        self.cold_every = None if cold_every is None else integer(cold_every, "cold_every")
        self.vector: torch.Tensor | None = None
        self.gap: tuple[float, float] | None = None  # (theta_1, theta_1 - theta_2) of the last Lanczos run
        self.gap_uses = 0  # one-product events since that run
        self.runs = 0

    def _start(self, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        cold = (self.vector is None or self.vector.numel() != dim
                or (self.cold_every is not None and self.runs % self.cold_every == 0))
        if cold:
            gen = torch.Generator().manual_seed(self.seed + self.runs)
            return torch.randn(dim, generator=gen, dtype=torch.float64).to(like), True
        assert self.vector is not None
        return self.vector.to(like), False

    def run(self, matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> tuple[LanczosEigen, bool]:
        """Run Lanczos for the top eigenpair; ``like`` gives dim, dtype and device. Returns (result, cold)."""
        v0, cold = self._start(like.numel(), like)
        quick = not cold and self.gap is not None and self.gap_uses < GAP_EVENTS
        out, hu = self._one_product(matvec, v0) if quick else (None, None)
        self.gap_uses += 1
        if out is None or not out.converged:
            if out is not None and hu is not None:  # Lanczos starts from the same vector: reuse its product
                matvec = _first_product_reused(matvec, out.vectors[:, 0], hu)
            out = thick_restart_lanczos(matvec, v0, k=1, which="LA", tol=self.tol, max_matvec=self.max_hvp,
                                        seed=self.seed + self.runs)
            self.gap, self.gap_uses = _top_gap(out), 0
        self.vector = out.vectors[:, 0].detach().clone()
        self.runs += 1
        return out, cold

    def _one_product(self, matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor
                     ) -> tuple[LanczosEigen, torch.Tensor]:
        """Rayleigh quotient and residual of the warm vector from one product, with the gap-based bound;
        also returns the product ``H u``."""
        assert self.gap is not None
        u = v0 / torch.linalg.vector_norm(v0)
        hu = matvec(u)
        theta = float(torch.dot(u.double(), hu.double()))
        r = float(torch.linalg.vector_norm((hu - theta * u).double()))
        top, gap = self.gap
        delta = min(gap, gap / max(abs(top), 1e-300) * abs(theta)) - r
        bound = min(r, r * r / delta) if delta > 0 else r
        out = LanczosEigen(values=np.array([theta]), vectors=u[:, None], residuals=np.array([r]),
                           error_bounds=np.array([bound]), ritz_values=np.array([theta, theta - gap]),
                           n_matvec=1, converged=bound <= self.tol * max(abs(theta), 1e-300))
        return out, hu

    def state_dict(self) -> dict[str, Any]:
        return {"vector": None if self.vector is None else self.vector.detach().cpu().clone(), "runs": self.runs,
                "gap": self.gap, "gap_uses": self.gap_uses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state.get("vector")
        self.runs = int(state.get("runs", 0))
        gap = state.get("gap")
        self.gap = None if gap is None else (float(gap[0]), float(gap[1]))
        self.gap_uses = int(state.get("gap_uses", 0))


def _top_gap(out: LanczosEigen) -> tuple[float, float] | None:
    """``(theta_1, theta_1 - theta_2)`` of the run's last projected matrix (None with a single Ritz value)."""
    ritz = np.sort(np.asarray(out.ritz_values, dtype=np.float64))[::-1]
    return (float(ritz[0]), float(ritz[0] - ritz[1])) if len(ritz) >= 2 else None


def _first_product_reused(matvec: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, hu: torch.Tensor
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``matvec`` whose first call (Lanczos's normalised start vector, parallel to ``u``) returns the product
    ``H u`` already computed, scaled to the vector's length."""
    calls = [0]

    def product(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return hu * (torch.linalg.vector_norm(v) / torch.linalg.vector_norm(u))
        return matvec(v)

    return product


def eigen_values(out: LanczosEigen, cold: bool) -> dict[str, float]:
    """The row values of one Lanczos run: value, residual (relative), error_bound, n_hvp, converged, cold."""
    theta = float(out.values[0])
    return {"value": theta, "residual": float(out.residuals[0]) / max(abs(theta), 1e-300),
            "error_bound": float(out.error_bounds[0]), "n_hvp": out.n_matvec, "converged": float(out.converged),
            "cold_start": float(cold)}


class LambdaMax(Measure):
    """Top eigenvalue of the probe-set Hessian, warm-started Lanczos (see the module docstring).

    Args:
        every: see :class:`~sharpscope.track.measure.Measure`.
        tol, max_hvp, cold_every, seed: see :class:`WarmStartLanczos`.
    """

    name = "lambda_max"

    def __init__(self, every: int | None = None, tol: float = 1e-2, max_hvp: int = 50,
                 cold_every: int | None = None, seed: int = 0) -> None:
        super().__init__(every)
        self.lanczos = WarmStartLanczos(tol, max_hvp, seed, cold_every)

    def measure(self, event: Event) -> TrackRow:
        op = event.operator()
        out, cold = self.lanczos.run(op.matvec, op.parameters_vector())
        values = eigen_values(out, cold)
        event.results[self.name] = values
        row = TrackRow(event.step, self.name, dict(values))
        # For SGD the stability threshold applies to lambda_max(H) itself (heavy-ball: (2 + 2 beta) / lr).
        if event.optimizer is not None and isinstance(base_optimizer(event.optimizer), torch.optim.SGD):
            threshold = stability_threshold(event.optimizer)
            if threshold is not None:
                row.values.update(threshold=threshold, ratio=row.values["value"] / threshold)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"lanczos": self.lanczos.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lanczos.load_state_dict(state.get("lanczos", {}))
