r"""Friendly-SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

F-SAM removes from the ascent the full-gradient component, estimated by an exponential moving
average :math:`m` of past batch gradients, and keeps the batch-specific noise. Per tensor:

.. math::
    d = g - \sigma\, m_{\text{prev}}, \qquad
    m = \lambda\, m_{\text{prev}} + (1 - \lambda)\, g, \qquad
    e(w) = \rho\, \frac{d}{\|d\| + 10^{-12}},

with :math:`m` initialised to the first gradient the tensor receives and :math:`d = g` at that
step (so the first step is plain SAM). :math:`\|d\|` is one norm over all parameter groups.
Defaults of the official code: :math:`\rho = 0.05, \sigma = 1, \lambda = 0.9`.

:math:`m` is optimizer state (``state[p]["momentum"]``) and travels in :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validate import fraction, number
from .base import SharpnessAwareOptimizer

__all__ = ["FriendlySAM"]


class FriendlySAM(SharpnessAwareOptimizer):
    r"""Friendly-SAM: SAM along :math:`g - \sigma m`, with :math:`m` an EMA of past gradients.

    Args:
        params: parameters, named parameters or param groups (each may set ``rho``, ``sigma``, ``lmbda``).
        base_optimizer: optimizer class for the descent, e.g. ``torch.optim.SGD``.
        rho: radius (>= 0), 0.05 by default.
        sigma: weight of the removed full-gradient estimate (>= 0), 1 by default.
        lmbda: EMA factor of :math:`m`, in [0, 1], 0.9 by default.
        **base_kwargs: passed to ``base_optimizer``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **base_kwargs: Any,
    ) -> None:
        number(rho, "rho", minimum=0.0)
        number(sigma, "sigma", minimum=0.0)
        fraction(lmbda, "lmbda")
        super().__init__(
            params, base_optimizer, {"rho": rho, "sigma": sigma, "lmbda": lmbda}, **base_kwargs
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        number(group["sigma"], "sigma", minimum=0.0)
        fraction(group["lmbda"], "lmbda")

    def _perturb(self, items, grad_norm):
        directions = []
        for group, _, p in items:
            g = p.grad
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = g.detach().clone()
                directions.append(g)
            else:
                m = state["momentum"]
                directions.append(g - group["sigma"] * m)
                m.mul_(group["lmbda"]).add_(g, alpha=1.0 - group["lmbda"])
        norms = torch.stack([torch.linalg.vector_norm(d).to(grad_norm.dtype) for d in directions])
        denominator = torch.linalg.vector_norm(norms) + 1e-12
        for (group, _, p), d in zip(items, directions):
            p.add_(d * (group["rho"] / denominator).to(p.dtype))
