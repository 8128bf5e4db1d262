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

The ascent and its statistics are computed by the pure function
:func:`~sharpscope.optim.zscore.zsharp_ascent`; ``first_step`` adds the perturbations it returns.
``first_step`` never synchronises with the host: the threshold is a selection
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

from .._validate import choice, number
from ..errors import UserInputError
from .base import SharpnessAwareOptimizer
from .zscore import SCOPES, FilteredTensorStats, check_percentile, zsharp_ascent

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
        percentile: quantile level of ``|z|`` that kept entries exceed, in (0, 1). A tensor of ``n``
            entries with distinct ``|z|`` keeps :math:`n - 1 - \lfloor p (n - 1) \rfloor` of them:
            0.95 keeps about 5 % of a large tensor, and up to :math:`5 \% + 0.95/n` of a small one
            (2 of 22, 11 of 216; see :mod:`sharpscope.optim.zscore`).
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
        number(rho, "rho", minimum=0.0)
        check_percentile(percentile)
        self.perturb_norm = choice(perturb_norm, "perturb_norm", SCOPES)
        self.threshold_scope = choice(threshold_scope, "threshold_scope", SCOPES)
        super().__init__(
            params, base_optimizer, {"rho": rho, "percentile": percentile}, **base_kwargs
        )
        # (parameter name, statistics) of each filtered tensor in the last ascent, on the device.
        self._stats: list[tuple[str, FilteredTensorStats]] = []

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_percentile(group["percentile"])
        if self.threshold_scope == "global" and group["percentile"] != self.param_groups[0]["percentile"]:
            raise UserInputError(
                "threshold_scope='global' pools all layers under one threshold, so every param "
                "group must use the same percentile"
            )

    def _perturb(self, items, grad_norm):
        ascent = zsharp_ascent(
            [p.grad for _, _, p in items],
            rho=[group["rho"] for group, _, _ in items],
            percentile=[group["percentile"] for group, _, _ in items],
            perturb_norm=self.perturb_norm,
            threshold_scope=self.threshold_scope,
            grad_norm=grad_norm,
        )
        ascent.add_to_([p for _, _, p in items])
        self._stats = [(items[s.index][1], s) for s in ascent.filtered]

    @property
    def mask_stats(self) -> pd.DataFrame:
        """Statistics of the last ascent, one row per filtered tensor (built when read).

        Columns: ``layer`` (parameter name, or ``param<i>`` without names), ``numel``, ``kept``
        (entries in the mask), ``kept_fraction``, ``threshold`` (in Z-score units),
        ``grad_norm`` (:math:`\\|g_t\\|`), ``perturbation_norm`` (:math:`\\|e_t\\|`), ``fallback``
        (:math:`\\|g_t \\odot m_t\\|` was not positive, e.g. an empty mask, so the SAM direction was
        used). Empty before the first step.
        """
        if not self._stats:
            return pd.DataFrame({c: [] for c in MASK_STATS_COLUMNS})
        records = [s for _, s in self._stats]
        numel = np.array([s.numel for s in records], dtype="int64")
        kept = _host_column([s.kept for s in records], torch.int64)
        return pd.DataFrame(
            {
                "layer": [name for name, _ in self._stats],
                "numel": numel,
                "kept": kept,
                "kept_fraction": kept / numel,
                "threshold": _host_column([s.threshold for s in records], torch.float64),
                "grad_norm": _host_column([s.grad_norm for s in records], torch.float64),
                "perturbation_norm": _host_column([s.perturbation_norm for s in records], torch.float64),
                "fallback": _host_column([s.fallback for s in records], torch.bool),
            },
            columns=list(MASK_STATS_COLUMNS),
        )


def _host_column(values: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """0-d device tensors as one numpy column (one copy per device, not one per value)."""
    if len({v.device for v in values}) == 1:
        return torch.stack([v.to(dtype) for v in values]).cpu().numpy()
    return torch.stack([v.to("cpu", dtype) for v in values]).numpy()
