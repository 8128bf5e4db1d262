r"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) around any base optimizer.

SAM ascends along the normalised gradient, with one norm over every parameter group:

.. math::  e(w) = \rho \, \frac{g}{\|g\| + 10^{-12}}

ASAM makes the neighbourhood scale-invariant with an element-wise operator :math:`T_w`:

.. math::  e(w) = \rho \, \frac{T_w^2\, g}{\|T_w\, g\| + \epsilon}

``variant="official"`` (SamsungLabs code): :math:`T_w = |w| + \eta` for tensors whose name contains
``"weight"`` (conv, linear and normalisation weights), :math:`T_w = 1` for the others,
:math:`\epsilon = 10^{-16}`, defaults :math:`\rho = 0.5, \eta = 0.01`.
``variant="davda54"`` (``adaptive=True`` of davda54/sam): :math:`T_w = |w| + \eta` for every tensor,
:math:`\epsilon = 10^{-12}`, defaults :math:`\rho = 2.0, \eta = 0`.

Both follow the two-pass protocol of :mod:`sharpscope.optim.base` (``first_step``, ``second_step``,
``step(closure)``; GradScaler recipe there).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .._validate import choice, number
from .base import SharpnessAwareOptimizer

__all__ = ["SAM", "ASAM"]


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-Aware Minimization: :math:`e = \rho\, g / (\|g\| + 10^{-12})`, then the base step.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` or param groups (a group may
            set its own ``rho``).
        base_optimizer: optimizer class for the descent, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius (>= 0), 0.05 by default.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        number(rho, "rho", minimum=0.0)
        super().__init__(params, base_optimizer, {"rho": rho}, **base_kwargs)

    def _perturb(self, items, grad_norm):
        scale_denominator = grad_norm + 1e-12
        for group, _, p in items:
            p.add_(p.grad * (group["rho"] / scale_denominator).to(p.dtype))


_ASAM_VARIANTS = {
    # variant: (default rho, default eta, norm epsilon, adapt only tensors named "weight")
    "official": (0.5, 0.01, 1e-16, True),
    "davda54": (2.0, 0.0, 1e-12, False),
}


class ASAM(SharpnessAwareOptimizer):
    r"""Adaptive SAM: :math:`e = \rho\, T_w^2 g / (\|T_w g\| + \epsilon)` (see the module docstring).

    Args:
        params: preferably ``model.named_parameters()``: the official rule adapts the tensors whose
            name contains ``"weight"``. Without names there is no way to tell a weight from a bias,
            so every tensor is adapted (:math:`T_w = |w| + \eta` everywhere) and a warning says so.
        base_optimizer: optimizer class for the descent.
        rho: radius; ``None`` picks the variant's default (0.5 official, 2.0 davda54).
        eta: offset of :math:`T_w`; ``None`` picks the variant's default (0.01 official, 0 davda54).
        variant: ``"official"`` (Kwon et al., SamsungLabs code) or ``"davda54"`` (its ``adaptive=True``).
        **base_kwargs: passed to ``base_optimizer``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float | None = None,
        eta: float | None = None,
        variant: str = "official",
        **base_kwargs: Any,
    ) -> None:
        variant = choice(variant, "variant", tuple(_ASAM_VARIANTS))
        default_rho, default_eta, self._eps, self._by_name = _ASAM_VARIANTS[variant]
        rho = default_rho if rho is None else rho
        eta = default_eta if eta is None else eta
        number(rho, "rho", minimum=0.0)
        number(eta, "eta", minimum=0.0)
        self.variant = variant
        super().__init__(params, base_optimizer, {"rho": rho, "eta": eta}, **base_kwargs)
        if self._by_name and not self.has_names:
            warnings.warn(
                "ASAM got parameters without names, so the official 'weight'-only rule cannot be "
                "applied: every tensor is adapted (T = |w| + eta). Pass model.named_parameters() "
                "for the official rule.",
                UserWarning,
                stacklevel=2,
            )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        number(group["eta"], "eta", minimum=0.0)

    def _adapted(self, name: str) -> bool:
        return not (self._by_name and self.has_names) or "weight" in name

    def _perturb(self, items, grad_norm):
        # T*g for adapted tensors, g for the others; N = ||T g|| over all of them.
        tg = []
        for group, name, p in items:
            if self._adapted(name):
                t = p.detach().abs().add_(group["eta"])
                tg.append((t, p.grad * t))
            else:
                tg.append((None, p.grad))
        norms = torch.stack([torch.linalg.vector_norm(v).to(grad_norm.dtype) for _, v in tg])
        denominator = torch.linalg.vector_norm(norms) + self._eps
        for (group, _, p), (t, v) in zip(items, tg):
            e = v * (group["rho"] / denominator).to(p.dtype)
            if t is not None:
                e.mul_(t)
            p.add_(e)
