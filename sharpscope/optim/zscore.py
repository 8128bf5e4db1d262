r"""Z-score gradient filtering: the pure maths of ZSharp's ascent direction.

ZSharp (J. Yun, "Sharpness-Aware Minimization with Z-Score Gradient Filtering", arXiv 2505.02369)
keeps, in each weight tensor, only the gradient entries whose layer-wise Z-score is large:

.. math::
    z = \frac{g - \mu(g)}{\sigma(g) + 10^{-12}}, \qquad
    \tau = Q_p(|z|), \qquad
    m = |z| > \tau ,

with :math:`\mu` the mean and :math:`\sigma` the unbiased (N-1) standard deviation over the whole
tensor, :math:`Q_p` the ``p``-quantile with linear interpolation (``torch.quantile``'s default) and
a *strict* comparison, so at most a fraction ``1 - p`` survives (fewer with ties).

Everything here is a function of tensors, runs on their device and never synchronises with the
host (no ``.item()``, no Python branch on a tensor value), so ``ZSharp.first_step`` can call it
inside a training step. These functions are the single source of truth: ``ZSharp`` calls them, and
so must any analysis that wants to report exactly the mask an optimizer step used.

``torch.quantile`` sorts its input and refuses more than :math:`2^{24}` elements;
:func:`selection_quantile` selects the two order statistics with ``torch.topk`` instead and gives
the same value bit for bit wherever ``torch.quantile`` works, and for tensors of any size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserInputError

#: Added to the standard deviation, as in the official code (a constant tensor gives z = 0).
STD_EPS = 1e-12

# Largest n for which float32 holds every index n - 1 exactly (and torch.quantile's own limit).
_FLOAT32_EXACT_INDEX = 2**24


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half/bfloat16 gradients are taken in float32; float32/64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def quantile_position(q: float, n: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """Order statistics and weight of the linear-interpolation ``q``-quantile of ``n`` values.

    The position is ``q * (n - 1)``, evaluated as ``torch.quantile`` does: in the tensor's dtype
    (float32 rounding included, which is what makes the result bit-identical). Above ``2**24``
    elements float32 cannot even represent every index, so the position is then taken in float64.

    Returns ``(lo, hi, weight)``: 0-based ranks of the order statistics around the position and
    the interpolation weight, so that ``quantile = lerp(v[lo], v[hi], weight)``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if n < 1:
        raise ValueError("cannot take the quantile of an empty tensor")
    if dtype == torch.float64 or n - 1 > _FLOAT32_EXACT_INDEX:
        pos = float(q) * float(n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        weight = pos - lo
    else:
        pos32 = np.float32(q) * np.float32(n - 1)
        lo = min(int(np.floor(pos32)), n - 1)
        weight = float(pos32 - np.float32(lo))
    hi = lo + 1 if weight > 0.0 else lo
    return lo, hi, weight


def selection_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Exact ``q``-quantile (linear interpolation) along the last dimension, by selection.

    Equal to ``torch.quantile(x, q, dim=-1)`` bit for bit for float32/float64 inputs of up to
    ``2**24`` elements per row, and defined the same way beyond (see :func:`quantile_position`).
    Only the ``k`` extreme values on the short side of the quantile are selected with
    ``torch.topk``, which is linear in ``x.shape[-1]`` instead of a full sort. A row containing NaN
    gives NaN, as in ``torch.quantile``.

    Args:
        x: tensor of shape ``(..., n)``; a 1-D tensor gives a 0-d result.
        q: quantile level in ``[0, 1]``.
    """
    n = x.shape[-1]
    lo, hi, weight = quantile_position(q, n, x.dtype)
    pair = hi != lo
    # Select the short side unsorted (much cheaper than sorted), then order its two extremes.
    if n - lo <= hi + 1:
        # Upper side: the n - lo largest values; v[lo] and v[hi] are its two smallest.
        top = torch.topk(x, n - lo, dim=-1, largest=True, sorted=False).values
        has_nan = torch.isnan(top.amax(dim=-1))  # topk ranks NaN above everything
        if pair:
            two = torch.topk(top, 2, dim=-1, largest=False, sorted=True).values
            v_lo, v_hi = two[..., 0], two[..., 1]
        else:
            v_lo = v_hi = top.amin(dim=-1)
    else:
        # Lower side: the hi + 1 smallest values; v[hi] and v[lo] are its two largest.
        bottom = torch.topk(x, hi + 1, dim=-1, largest=False, sorted=False).values
        has_nan = torch.isnan(x).any(dim=-1)
        if pair:
            two = torch.topk(bottom, 2, dim=-1, largest=True, sorted=True).values
            v_hi, v_lo = two[..., 0], two[..., 1]
        else:
            v_lo = v_hi = bottom.amax(dim=-1)
    value = torch.lerp(v_lo, v_hi, weight) if weight > 0.0 else v_lo
    return torch.where(has_nan, torch.full_like(value, float("nan")), value)


def layer_zscores(g: torch.Tensor) -> torch.Tensor:
    r"""Signed Z-scores of one tensor: :math:`(g - \mu) / (\sigma_{N-1} + 10^{-12})` over all entries.

    Half/bfloat16 input is standardised in float32; a single entry has an undefined (NaN) std and
    gives NaN scores, which :func:`zscore_mask` turns into an empty mask.
    """
    g = g.to(_stat_dtype(g.dtype))
    mean = g.mean()
    # One entry: the unbiased std is undefined (NaN); say so without torch's warning every step.
    std = g.std() if g.numel() > 1 else torch.full_like(mean, float("nan"))
    return (g - mean) / (std + STD_EPS)


@dataclass(frozen=True)
class ZScoreFilter:
    """The outcome of filtering one gradient tensor (all fields are device tensors).

    Attributes:
        mask: boolean tensor shaped like the gradient, ``|z| > threshold``.
        threshold: 0-d tensor, the quantile of ``|z|`` that the scores must exceed (Z-score units).
        kept: 0-d int64 tensor, number of ``True`` entries in ``mask``.
    """

    mask: torch.Tensor
    threshold: torch.Tensor
    kept: torch.Tensor


def check_percentile(percentile: Any) -> float:
    """Return ``percentile`` as a float in the open interval (0, 1), or raise ``UserInputError``."""
    try:
        value = float(percentile)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise UserInputError(
            f"percentile must be in the open interval (0, 1), e.g. 0.95 (keep the top 5 %); got {percentile!r}"
        )
    return value


def zscore_mask(g: torch.Tensor, percentile: float = 0.95) -> ZScoreFilter:
    """Per-tensor Z-score filter of ZSharp's default ``threshold_scope="tensor"``.

    ``threshold = selection_quantile(|z|, percentile)`` over the tensor's entries and
    ``mask = |z| > threshold`` (strict). A constant gradient (all ``|z|`` tied) or a single entry
    (NaN std) keeps nothing; ZSharp then falls back to the SAM direction for that tensor.
    """
    percentile = check_percentile(percentile)
    abs_z = layer_zscores(g).abs()
    threshold = selection_quantile(abs_z.reshape(-1), percentile)
    mask = abs_z > threshold
    return ZScoreFilter(mask=mask, threshold=threshold, kept=mask.sum())


def zscore_masks(
    grads: Sequence[torch.Tensor], percentile: float = 0.95, scope: str = "tensor"
) -> list[ZScoreFilter]:
    """Filter several gradient tensors, each standardised on its own.

    ``scope="tensor"`` (the official code) gives every tensor its own threshold
    (:func:`zscore_mask`). ``scope="global"`` pools the per-tensor ``|z|`` of all the tensors and
    takes one threshold over the pool, so that each tensor keeps its entries whose Z-score (within
    its own layer) ranks in the top ``1 - percentile`` of all layers together.
    """
    if scope == "tensor":
        return [zscore_mask(g, percentile) for g in grads]
    if scope != "global":
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    percentile = check_percentile(percentile)
    if not grads:
        return []
    abs_z = [layer_zscores(g).abs() for g in grads]
    dtype = torch.promote_types(abs_z[0].dtype, torch.float32)
    for a in abs_z[1:]:
        dtype = torch.promote_types(dtype, a.dtype)
    pooled = torch.cat([a.reshape(-1).to(dtype) for a in abs_z])
    threshold = selection_quantile(pooled, percentile)
    out = []
    for a in abs_z:
        mask = a > threshold.to(a.dtype)
        out.append(ZScoreFilter(mask=mask, threshold=threshold, kept=mask.sum()))
    return out


def is_filtered(p: torch.Tensor) -> bool:
    """Whether ZSharp filters this tensor: weights of conv/linear/embedding layers (``ndim > 1``).

    Biases and normalisation parameters (``ndim <= 1``) keep the plain SAM direction.
    """
    return p.ndim > 1
