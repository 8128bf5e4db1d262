r"""``zscores``: per-layer shape of the gradient Z-scores that ZSharp filters, on the probe set.

The gradient of the probe loss (eval mode, ``torch.autograd.grad``: ``.grad`` untouched) is
standardised per filtered tensor (``ndim > 1``) exactly as ZSharp does
(:func:`sharpscope.analysis.gradients.zscore_statistics`). Per layer: ``kurtosis`` (excess,
:math:`m_4 / m_2^2 - 3`; 0 for a Gaussian), ``tail_mass`` :math:`P(|z| > t)` (Gaussian:
:math:`\operatorname{erfc}(t / \sqrt 2)`, 0.27 % at ``t = 3``) and ``threshold`` (the ``percentile``
quantile of :math:`|z|`), plus a histogram of :math:`z` for TensorBoard. One forward and one backward
pass on the probe set per event. Row values: the means over layers and the Gaussian tail mass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._validate import positive_number
from ..analysis.evaluation import full_data_gradient
from ..analysis.gradients import bin_edges, zscore_statistics
from ..optim.zscore import check_percentile, is_filtered
from .measure import Event, Measure
from .rows import TrackRow


class ZScores(Measure):
    """Per-layer excess kurtosis, tail mass and threshold of the probe gradient's Z-scores.

    Args:
        tail: the ``|z|`` level of ``tail_mass``.
        percentile: the threshold's quantile level (default: the optimizer's, else 0.95).
        bins: histogram bins over ``[-8, 8]``.
    """

    name = "zscores"

    def __init__(self, every: int | None = None, tail: float = 3.0, percentile: float | None = None,
                 bins: int = 64) -> None:
        super().__init__(every)
        self.tail = positive_number(tail, "zscores tail")
        self.percentile = None if percentile is None else check_percentile(percentile)
        self.edges = bin_edges(bins)

    def _percentile(self, event: Event) -> float:
        if self.percentile is not None:
            return self.percentile
        groups = getattr(event.optimizer, "param_groups", None) or [{}]
        return float(groups[0].get("percentile", 0.95))

    def measure(self, event: Event) -> TrackRow | None:
        named = [(n, p) for n, p in event.model.named_parameters() if p.requires_grad and is_filtered(p)]
        if not named:
            return None
        with torch.enable_grad():
            _, grads = full_data_gradient(event.model, event.loss_fn, event.batches, [p for _, p in named])
        percentile = self._percentile(event)
        edges = torch.as_tensor(self.edges, dtype=torch.float64, device=grads[0].device)
        layers, histograms = {}, {}
        for (name, _), g in zip(named, grads):
            s = zscore_statistics(g, edges, percentile, (self.tail,))
            m2, m4 = float(s["central"][1]), float(s["central"][3])
            layers[name] = {"kurtosis": m4 / m2**2 - 3 if m2 > 0 else None,
                            "tail_mass": float(s["tail_counts"][0]) / g.numel(), "threshold": float(s["threshold"])}
            histograms[name] = (self.edges, s["counts"].cpu().numpy().astype(np.int64))
        values = {f"mean_{k}": float(np.mean([v[k] for v in layers.values() if v.get(k) is not None] or [math.nan]))
                  for k in ("kurtosis", "tail_mass", "threshold")}
        values["gaussian_tail_mass"] = math.erfc(self.tail / math.sqrt(2))
        return TrackRow(event.step, self.name, values, layers=layers, histograms=histograms)  # type: ignore[arg-type]
