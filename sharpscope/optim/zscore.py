r"""Z-score gradient filtering: the pure maths of ZSharp's ascent direction.

ZSharp (J. Yun, "Sharpness-Aware Minimization with Z-Score Gradient Filtering", arXiv 2505.02369)
keeps, in each weight tensor, only the gradient entries whose layer-wise Z-score is large:

.. math::
    z = \frac{g - \mu(g)}{\sigma(g) + 10^{-12}}, \qquad
    \tau = Q_p(|z|), \qquad
    m = |z| > \tau ,

with :math:`\mu` the mean and :math:`\sigma` the unbiased (N-1) standard deviation over the whole
tensor, :math:`Q_p` the ``p``-quantile with linear interpolation (``torch.quantile``'s default) and
a *strict* comparison. With :math:`s_0 \le \dots \le s_{n-1}` the ``n`` values of :math:`|z|` sorted,

.. math::
    P = p\,(n - 1), \quad k = \lfloor P \rfloor, \quad f = P - k, \qquad
    Q_p = s_k + f\,(s_{k+1} - s_k) \quad (s_k \text{ when } f = 0).

**What survives.** Every :math:`s_i` with :math:`i > k` exceeds :math:`Q_p` when the values are
distinct, and none with :math:`i \le k` does, so the mask keeps exactly
:math:`n - 1 - \lfloor p (n - 1) \rfloor = \lceil (1 - p)(n - 1) \rceil` of ``n`` distinct values
(fewer with ties at the threshold; one more or fewer where the float32 rounding of
:math:`p (n - 1)` moves :math:`k`, which first happens above about 2 million entries at
``p = 0.95``, see :func:`quantile_position`). That is *not* "at most a fraction ``1 - p``": the kept fraction
lies between :math:`(1 - p)(1 - 1/n)` and :math:`1 - p + p/n`, so ``p = 0.95`` keeps 2 of 22 entries
(9.1 %), 11 of 216 (5.1 %), 4 of 81 (4.9 %), and close to 5 % only of large tensors.

Everything here is a function of tensors, runs on their device and never synchronises with the
host (no ``.item()``, no Python branch on a tensor value), so ``ZSharp.first_step`` can call it
inside a training step. These functions are the single source of truth: ``ZSharp`` calls
:func:`zsharp_ascent`, and so must any analysis that wants to report exactly the mask and the
perturbation an optimizer step used.

:func:`selection_quantile` computes :math:`Q_p` by selecting the two order statistics with
``torch.topk`` (linear time, any tensor size) instead of sorting as ``torch.quantile`` does; see its
docstring for the rounding of :math:`P`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validate import choice, fraction, number
from ..errors import UserInputError
from .base import global_grad_norm

#: Added to the standard deviation, as in the official code (a constant tensor gives z = 0).
STD_EPS = 1e-12

#: The values of ZSharp's ``threshold_scope`` and ``perturb_norm`` options (the official one first).
SCOPES = ("tensor", "global")

# Above this many values float32 cannot hold every index n - 1, so the position is taken in float64.
_FLOAT32_EXACT_INDEX = 2**24


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half/bfloat16 gradients are taken in float32; float32/64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def quantile_position(q: float, n: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    r"""Ranks and weight of the linear-interpolation ``q``-quantile of ``n`` values.

    :math:`P = q (n - 1)`, :math:`k = \lfloor P \rfloor`, :math:`f = P - k`. :math:`P` is rounded to
    ``dtype`` first (float32 unless ``dtype`` is float64, and float64 beyond ``2**24`` values), as
    ``torch.quantile`` did up to torch 2.13. For float32 and large ``n`` that rounding can move ``k``
    by one from the exact decimal value (first at n = 229,402 for q = 0.99, 2,207,542 for q = 0.95),
    and so the kept count of the mask by one; the quantile's value moves by at most the rounding
    error of :math:`P` times the gap between neighbouring order statistics.

    Returns ``(lo, hi, weight)`` = :math:`(k, k + 1, f)`, or :math:`(k, k, 0)` when :math:`f = 0`,
    so that ``quantile = lerp(s[lo], s[hi], weight)`` with ``s`` sorted ascending.
    """
    q = fraction(q, "q")
    if n < 1:
        raise UserInputError("cannot take the quantile of an empty tensor")
    if dtype == torch.float64 or n - 1 > _FLOAT32_EXACT_INDEX:
        pos = q * float(n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        weight = pos - lo
    else:
        pos32 = np.float32(q) * np.float32(n - 1)
        lo = min(int(np.floor(pos32)), n - 1)
        weight = float(pos32 - np.float32(lo))
    hi = lo + 1 if weight > 0.0 else lo
    return lo, hi, weight


def selection_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    r"""The ``q``-quantile with linear interpolation along the last dimension, by selection.

    With ``s`` the ``n`` values of a row sorted ascending: :math:`Q_q = s_k + f (s_{k+1} - s_k)`,
    :math:`k = \lfloor q (n - 1) \rfloor`, :math:`f = q (n - 1) - k` (rounding of the position:
    :func:`quantile_position`; the interpolation is ``torch.lerp``'s). This is the definition
    ``torch.quantile`` documents; its last bits differ between torch versions (torch 2.13 gives the
    same bits as this function, torch 2.14 differs by a few units in the last place), which can
    flip the mask ``|z| > Q`` only for an entry within that distance of the threshold. Only the
    extreme values on the short side of the quantile are selected with ``torch.topk``: linear in
    ``n``, and for any ``n`` (``torch.quantile`` refused more than ``2**24`` values up to torch 2.13).
    A row containing NaN gives NaN.

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
            "percentile must be in the open interval (0, 1), e.g. 0.95 (keep the entries whose |z| exceeds "
            f"the 0.95-quantile of |z|); got {percentile!r}"
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
    takes one threshold over the pool: each tensor keeps its entries whose ``|z|`` (standardised
    within its own layer) exceeds the ``percentile``-quantile of the pooled ``|z|`` of all layers.
    """
    scope = choice(scope, "scope", SCOPES)
    if scope == "tensor":
        return [zscore_mask(g, percentile) for g in grads]
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


# --- ZSharp's whole ascent ------------------------------------------------------------------
@dataclass(frozen=True)
class FilteredTensorStats:
    r"""Statistics of one filtered tensor in one ZSharp ascent (0-d device tensors: read them lazily).

    Attributes:
        index: position of the tensor in the ``grads`` given to :func:`zsharp_ascent`.
        numel: number of entries of the tensor.
        kept: int64, the number of entries in the mask :math:`m_t`.
        threshold: the quantile of :math:`|z_t|` that kept entries exceed, in Z-score units (NaN when
            the gradient holds NaN or has one entry).
        grad_norm: :math:`\|g_t\|`.
        perturbation_norm: :math:`\|e_t\|`.
        fallback: bool, :math:`\|g_t \odot m_t\|` was not positive (empty mask, only zero entries
            kept, or NaN), so the tensor was perturbed along the SAM direction.
    """

    index: int
    numel: int
    kept: torch.Tensor
    threshold: torch.Tensor
    grad_norm: torch.Tensor
    perturbation_norm: torch.Tensor
    fallback: torch.Tensor


@dataclass(frozen=True)
class ZSharpAscent:
    r"""The result of :func:`zsharp_ascent`: :math:`e_t = s_t\, (g_t \odot k_t)` for every tensor.

    Attributes:
        grads: the gradients :math:`g_t` given (not copied).
        scales: :math:`s_t`, 0-d tensors in each gradient's dtype.
        keep: :math:`k_t`, the boolean mask of the entries :math:`e_t` moves (:math:`m_t`, or every
            entry on fallback) for a filtered tensor; ``None`` (every entry) for the others.
        filtered: one :class:`FilteredTensorStats` per filtered tensor (``ndim > 1``), in order.
        grad_norm: :math:`\|g\|`, the global norm of the raw gradients (0-d).
    """

    grads: list[torch.Tensor]
    scales: list[torch.Tensor]
    keep: list[torch.Tensor | None]
    filtered: list[FilteredTensorStats]
    grad_norm: torch.Tensor

    def _multiplier(self, i: int) -> torch.Tensor:
        keep = self.keep[i]
        return self.scales[i] if keep is None else keep.to(self.scales[i].dtype) * self.scales[i]

    @property
    def perturbations(self) -> list[torch.Tensor]:
        """:math:`e_t` for every gradient, in order, shaped and typed like it (computed when read)."""
        return [g * self._multiplier(i) for i, g in enumerate(self.grads)]

    def add_to_(self, params: Sequence[torch.Tensor]) -> None:
        """``p += e_t`` in place for the parameters the gradients belong to (what ``first_step`` does).

        A filtered tensor gets one fused multiply-add (``addcmul_``), the others ``p + g * s``: the
        same roundings as ZSharp has always used, so results stay bit for bit those of earlier versions.
        """
        for i, (p, g) in enumerate(zip(params, self.grads, strict=True)):
            if self.keep[i] is None:
                p.add_(g * self.scales[i])
            else:
                p.addcmul_(g, self._multiplier(i))


@dataclass(frozen=True)
class _Masked:
    """One filtered gradient: its filter, norms and fallback flag."""

    filter: ZScoreFilter
    grad_norm: torch.Tensor
    kept_norm: torch.Tensor
    fallback: torch.Tensor

    @property
    def direction_norm(self) -> torch.Tensor:
        """Norm of the direction this tensor ascends along: g * m, or g on fallback."""
        return torch.where(self.fallback, self.grad_norm, self.kept_norm)


def zsharp_ascent(
    grads: Sequence[torch.Tensor],
    rho: float | Sequence[float] = 0.05,
    percentile: float | Sequence[float] = 0.95,
    *,
    perturb_norm: str = "tensor",
    threshold_scope: str = "tensor",
    grad_norm: torch.Tensor | None = None,
) -> ZSharpAscent:
    r"""ZSharp's ascent :math:`e(w)` from the gradients :math:`g_t`, with its statistics (pure, no host sync).

    For a filtered tensor (``ndim > 1``) with mask :math:`m_t` (:func:`zscore_mask`, or one pooled
    threshold with ``threshold_scope="global"``):

    .. math::
        e_t = \rho_t \frac{g_t \odot m_t}{\|g_t \odot m_t\| + 10^{-12}}, \quad\text{or}\quad
        e_t = \rho_t \frac{g_t}{\|g\| + 10^{-12}} \text{ when } \|g_t \odot m_t\| = 0 \text{ (fallback)};

    for the other tensors :math:`e_t = \rho_t\, g_t / (\|g\| + 10^{-12})`, with :math:`\|g\|` the global
    norm of the raw gradients. ``perturb_norm="global"`` instead divides every direction
    (:math:`g_t \odot m_t`, :math:`g_t` on fallback and for unfiltered tensors) by the global norm of
    the whole direction, plus :math:`10^{-12}`.

    Args:
        grads: the gradients, one per parameter tensor.
        rho: radius, one for all tensors or one per tensor (>= 0).
        percentile: quantile level of ``|z|`` in (0, 1), one for all or one per tensor (with
            ``threshold_scope="global"`` the filtered tensors must share one).
        perturb_norm: ``"tensor"`` (official) or ``"global"``.
        threshold_scope: ``"tensor"`` (official) or ``"global"``.
        grad_norm: :math:`\|g\|` if already computed (0-d tensor), else computed here.
    """
    perturb_norm = choice(perturb_norm, "perturb_norm", SCOPES)
    threshold_scope = choice(threshold_scope, "threshold_scope", SCOPES)
    if not grads:
        raise UserInputError("zsharp_ascent needs at least one gradient tensor; got none")
    rhos = _per_tensor(rho, len(grads), "rho", lambda v: number(v, "rho", minimum=0.0))
    percentiles = _per_tensor(percentile, len(grads), "percentile", check_percentile)
    if grad_norm is None:
        grad_norm = global_grad_norm(list(grads))
    index = [i for i, g in enumerate(grads) if is_filtered(g)]
    filters = _filters([grads[i] for i in index], [percentiles[i] for i in index], threshold_scope)
    masked = {i: _masked(grads[i], f, grad_norm.dtype) for i, f in zip(index, filters)}
    if perturb_norm == "global":
        shared = _global_denominator(grads, masked, grad_norm.dtype)
    else:
        shared = grad_norm + 1e-12
    scales, keep, stats = [], [], []
    for i, (g, r) in enumerate(zip(grads, rhos)):
        if i not in masked:
            scales.append((r / shared).to(g.dtype))
            keep.append(None)
            continue
        scale, stat = _filtered_scale(i, g, r, masked[i], shared, perturb_norm == "tensor")
        scales.append(scale.to(g.dtype))
        keep.append(masked[i].filter.mask | masked[i].fallback)
        stats.append(stat)
    return ZSharpAscent(grads=list(grads), scales=scales, keep=keep, filtered=stats, grad_norm=grad_norm)


def _filtered_scale(index: int, g: torch.Tensor, rho: float, m: _Masked, shared: torch.Tensor,
                    per_tensor: bool) -> tuple[torch.Tensor, FilteredTensorStats]:
    """Scale of a filtered tensor's direction and its statistics; ``shared`` is ``||g|| + 1e-12``
    (per-tensor norm, used on fallback) or the global direction norm plus 1e-12."""
    if per_tensor:
        scale = torch.where(m.fallback, rho / shared, rho / (m.kept_norm + 1e-12))
    else:
        scale = rho / shared
    stat = FilteredTensorStats(
        index=index, numel=g.numel(), kept=m.filter.kept, threshold=m.filter.threshold,
        grad_norm=m.grad_norm, perturbation_norm=scale * m.direction_norm, fallback=m.fallback,
    )
    return scale, stat


def _per_tensor(value: Any, n: int, name: str, check: Callable[[Any], float]) -> list[float]:
    """One checked value per tensor, from a single value or a sequence of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserInputError(f"{name} must be one number or one per gradient ({n}); got {len(value)} values")
        return [check(v) for v in value]
    return [check(value)] * n


def _filters(grads: list[torch.Tensor], percentiles: list[float], scope: str) -> list[ZScoreFilter]:
    """The Z-score filter of each filtered gradient (one pooled threshold with ``scope="global"``)."""
    if scope == "tensor":
        return [zscore_mask(g, p) for g, p in zip(grads, percentiles)]
    if not grads:  # nothing to filter, so no threshold to take
        return []
    if len(set(percentiles)) > 1:
        raise UserInputError(
            "threshold_scope='global' pools all filtered tensors under one threshold, so they must share "
            f"one percentile; got {sorted(set(percentiles))}"
        )
    return zscore_masks(grads, percentiles[0], "global")


def _masked(g: torch.Tensor, f: ZScoreFilter, dtype: torch.dtype) -> _Masked:
    kept_norm = torch.linalg.vector_norm(g * f.mask).to(dtype)
    # "not > 0" rather than "== 0": a NaN norm falls back too (and stays NaN, as the gradient is).
    return _Masked(f, torch.linalg.vector_norm(g).to(dtype), kept_norm, ~(kept_norm > 0))


def _global_denominator(grads: Sequence[torch.Tensor], masked: dict[int, _Masked], dtype: torch.dtype
                        ) -> torch.Tensor:
    """Norm of the whole direction (g * m, g on fallback, g for unfiltered tensors), plus 1e-12."""
    squares = [
        masked[i].direction_norm ** 2 if i in masked else torch.linalg.vector_norm(g).to(dtype) ** 2
        for i, g in enumerate(grads)
    ]
    return torch.stack(squares).sum().sqrt() + 1e-12
