r"""ZSharp: SAM whose ascent keeps only the gradient entries with large layer-wise Z-scores.

J. Yun, "Sharpness-Aware Minimization with Z-Score Gradient Filtering", arXiv 2505.02369 (2025).
Defaults reproduce the official code. For each tensor :math:`t` with a gradient :math:`g_t`:

- if :math:`t` has ``ndim > 1`` (conv/linear weights, embeddings), the Z-score filter of
  :mod:`sharpscope.optim.zscore` gives :math:`m_t = |z_t| > Q_p(|z_t|)` and

  .. math::  e_t = \rho\, \frac{g_t \odot m_t}{\|g_t \odot m_t\| + 10^{-12}}

  (each filtered tensor is perturbed to norm :math:`\rho`); if the mask keeps nothing (constant
  gradient, single entry) the tensor falls back to SAM: :math:`e_t = \rho\, g_t / (\|g\| + 10^{-12})`;
- otherwise (biases, normalisation parameters) :math:`e_t = \rho\, g_t / (\|g\| + 10^{-12})`, with
  :math:`\|g\|` the global norm of the raw gradient.

The descent is the base optimizer's step with the full, unfiltered gradient at :math:`w + e`.
Because every filtered tensor gets norm :math:`\rho`, :math:`\|e\| \approx \rho\sqrt{K}` for
:math:`K` filtered tensors (about 0.22 for ResNet-20 at :math:`\rho = 0.05`, against 0.05 for SAM).

Options (not the paper's code): ``perturb_norm="global"`` scales the whole direction (filtered
entries, fallbacks and unfiltered tensors together) to norm :math:`\rho`;
``threshold_scope="global"`` uses one threshold pooled over the ``|z|`` of all filtered tensors.

``first_step`` never synchronises with the host: the threshold is an exact selection
(:func:`~sharpscope.optim.zscore.selection_quantile`, any tensor size), the fallback is a
``torch.where``, and the per-tensor statistics stay on the device until :attr:`ZSharp.mask_stats`
is read. Mixed precision: see the GradScaler recipe in :mod:`sharpscope.optim.base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import UserInputError
from .base import SharpnessAwareOptimizer, check_nonnegative
from .zscore import check_percentile, is_filtered, zscore_mask, zscore_masks

__all__ = ["ZSharp", "MASK_STATS_COLUMNS"]

#: Columns of :attr:`ZSharp.mask_stats`, in order.
MASK_STATS_COLUMNS = (
    "layer",
    "numel",
    "kept",
    "kept_fraction",
    "threshold",
    "grad_norm",
    "perturbation_norm",
    "fallback",
)


class ZSharp(SharpnessAwareOptimizer):
    r"""ZSharp (Z-score filtered SAM) around any base optimizer; see the module docstring.

    Args:
        params: ``model.named_parameters()`` (names label :attr:`mask_stats`), ``parameters()`` or
            param groups (each may set ``rho`` and ``percentile``).
        base_optimizer: optimizer class for the descent, e.g. ``torch.optim.SGD``.
        rho: radius (>= 0), 0.05 by default.
        percentile: quantile level of ``|z|`` to exceed, in (0, 1); 0.95 keeps at most 5 %.
        perturb_norm: ``"tensor"`` (official: each filtered tensor to norm rho) or ``"global"``.
        threshold_scope: ``"tensor"`` (official: one threshold per tensor) or ``"global"``.
        **base_kwargs: passed to ``base_optimizer``.

    Example::

        opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
        opt.mask_stats  # DataFrame, one row per filtered tensor
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        percentile: float = 0.95,
        perturb_norm: str = "tensor",
        threshold_scope: str = "tensor",
        **base_kwargs: Any,
    ) -> None:
        check_nonnegative("rho", rho)
        check_percentile(percentile)
        if perturb_norm not in ("tensor", "global"):
            raise UserInputError(f"perturb_norm must be 'tensor' or 'global', got {perturb_norm!r}")
        if threshold_scope not in ("tensor", "global"):
            raise UserInputError(
                f"threshold_scope must be 'tensor' or 'global', got {threshold_scope!r}"
            )
        self.perturb_norm = perturb_norm
        self.threshold_scope = threshold_scope
        super().__init__(
            params, base_optimizer, {"rho": rho, "percentile": percentile}, **base_kwargs
        )
        # (name, numel, kept count, [threshold, grad_norm, perturbation_norm, fallback]) on device.
        self._stats: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_percentile(group["percentile"])
        if self.threshold_scope == "global" and group["percentile"] != self.param_groups[0]["percentile"]:
            raise UserInputError(
                "threshold_scope='global' pools all layers under one threshold, so every param "
                "group must use the same percentile"
            )

    def _perturb(self, items, grad_norm):
        filtered = [(group, name, p) for group, name, p in items if is_filtered(p)]
        if self.threshold_scope == "tensor":
            filters = [zscore_mask(p.grad, group["percentile"]) for group, _, p in filtered]
        else:
            percentile = filtered[0][0]["percentile"] if filtered else 0.5
            filters = zscore_masks([p.grad for _, _, p in filtered], percentile, "global")

        # Per filtered tensor: its filter, ||g_t||, ||g_t * m_t|| and the fallback flag (device scalars).
        info = {}
        for (_, _, p), f in zip(filtered, filters):
            g = p.grad
            kept_norm = torch.linalg.vector_norm(g * f.mask).to(grad_norm.dtype)
            info[id(p)] = (f, torch.linalg.vector_norm(g).to(grad_norm.dtype), kept_norm, ~(kept_norm > 0))

        if self.perturb_norm == "global":
            # Direction d: g*m for filtered tensors, g for fallbacks and unfiltered ones.
            squares = []
            for _, _, p in items:
                if id(p) in info:
                    _, g_norm, kept_norm, fallback = info[id(p)]
                    squares.append(torch.where(fallback, g_norm, kept_norm) ** 2)
                else:
                    squares.append(torch.linalg.vector_norm(p.grad).to(grad_norm.dtype) ** 2)
            global_denominator = torch.stack(squares).sum().sqrt() + 1e-12
        sam_denominator = grad_norm + 1e-12

        stats = []
        for group, name, p in items:
            rho = group["rho"]
            if id(p) not in info:
                denominator = global_denominator if self.perturb_norm == "global" else sam_denominator
                p.add_(p.grad * (rho / denominator).to(p.dtype))
                continue
            f, g_norm, kept_norm, fallback = info[id(p)]
            if self.perturb_norm == "global":
                scale = rho / global_denominator
            else:
                scale = torch.where(fallback, rho / sam_denominator, rho / (kept_norm + 1e-12))
            # Entry-wise multiplier: scale on kept entries (all entries on fallback), else 0.
            multiplier = (f.mask | fallback).to(p.dtype) * scale.to(p.dtype)
            p.addcmul_(p.grad, multiplier)
            perturbation_norm = scale * torch.where(fallback, g_norm, kept_norm)
            stats.append(
                (
                    name,
                    p.numel(),
                    f.kept,
                    torch.stack(
                        [
                            f.threshold.to(grad_norm.dtype),
                            g_norm,
                            perturbation_norm,
                            fallback.to(grad_norm.dtype),
                        ]
                    ),
                )
            )
        self._stats = stats

    @property
    def mask_stats(self) -> pd.DataFrame:
        """Statistics of the last ascent, one row per filtered tensor (built when read).

        Columns: ``layer`` (parameter name, or ``param<i>`` without names), ``numel``, ``kept``
        (entries in the mask), ``kept_fraction``, ``threshold`` (in Z-score units),
        ``grad_norm`` (:math:`\\|g_t\\|`), ``perturbation_norm`` (:math:`\\|e_t\\|`), ``fallback``
        (the mask was empty and the SAM direction was used). Empty before the first step.
        """
        if not self._stats:
            return pd.DataFrame({c: [] for c in MASK_STATS_COLUMNS})
        values = torch.stack([v.to(torch.float64).cpu() for *_, v in self._stats]).numpy()
        kept = torch.stack([k.cpu() for _, _, k, _ in self._stats]).numpy().astype("int64")
        numel = np.array([n for _, n, _, _ in self._stats], dtype="int64")
        return pd.DataFrame(
            {
                "layer": [name for name, *_ in self._stats],
                "numel": numel,
                "kept": kept,
                "kept_fraction": kept / numel,
                "threshold": values[:, 0],
                "grad_norm": values[:, 1],
                "perturbation_norm": values[:, 2],
                "fallback": values[:, 3] > 0.5,
            },
            columns=list(MASK_STATS_COLUMNS),
        )
