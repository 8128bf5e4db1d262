"""``masks``: what ZSharp's filter kept in its last ascent, per layer, read from the optimizer.

No extra forward or backward pass: the statistics are those :attr:`sharpscope.optim.ZSharp.mask_stats`
recorded in the last ``first_step``. Per filtered layer: ``kept_fraction``, ``threshold`` (Z-score
units), ``perturbation_share`` = :math:`\\|e_t\\|^2 / \\sum_u \\|e_u\\|^2` over the filtered layers (the
unfiltered biases and normalisation parameters carry the rest of the perturbation, at most
:math:`\\rho^2` in all) and ``fallback`` (1 when the layer fell back to the SAM direction). Row values:
``kept_fraction`` (all layers together, kept entries / entries), ``fallbacks`` and ``n_layers``.
"""

from __future__ import annotations

import torch

from ..errors import UserInputError
from .measure import Event, Measure
from .rows import TrackRow


class Masks(Measure):
    """ZSharp's per-layer kept fraction, threshold and perturbation share (see the module docstring)."""

    name = "masks"

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None or not hasattr(optimizer, "mask_stats"):
            got = "no optimizer" if optimizer is None else type(optimizer).__name__
            raise UserInputError(f"the 'masks' measure reads ZSharp's mask statistics: pass optimizer=<a ZSharp> "
                                 f"to tracker.step (got {got}), or drop 'masks'")

    def measure(self, event: Event) -> TrackRow | None:
        self.check(event.optimizer)
        stats = event.optimizer.mask_stats  # type: ignore[union-attr]
        if len(stats) == 0:
            return None  # no ascent yet
        share = stats["perturbation_norm"] ** 2
        total = float(share.sum())
        layers = {
            str(row.layer): {"kept_fraction": float(row.kept_fraction), "threshold": float(row.threshold),
                             "perturbation_share": float(s) / total if total > 0 else None,
                             "fallback": float(bool(row.fallback))}
            for row, s in zip(stats.itertuples(index=False), share)
        }
        values = {"kept_fraction": float(stats["kept"].sum()) / float(stats["numel"].sum()),
                  "fallbacks": float(stats["fallback"].sum()), "n_layers": float(len(stats))}
        return TrackRow(event.step, self.name, values, layers=layers)  # type: ignore[arg-type]
