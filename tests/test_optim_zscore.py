"""ZSharp's filter maths (sharpscope.optim.zscore) against the documented formula, computed in numpy.

The threshold is defined by its formula (linear interpolation): with ``s`` the values sorted
ascending, ``P = p (n - 1)``, ``k = floor(P)``, ``f = P - k``, ``Q = s[k] + f (s[k+1] - s[k])``.
:func:`formula_quantile` computes it independently in float64 numpy. The implementation (and
``torch.quantile``, whose last bits vary between torch versions) must agree within the rounding of
the tensor's dtype (:func:`quantile_tolerance`), and masks ``|z| > Q`` must agree except at
entries within that rounding distance of the threshold.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sharpscope.optim import ZSharp
from sharpscope.optim.zscore import (
    layer_zscores,
    quantile_position,
    selection_quantile,
    zscore_mask,
    zscore_masks,
)


# --- the formula, independently in float64 numpy ---------------------------------------------------
def formula_quantile(values, p: float) -> tuple[float, float]:
    """``(Q, tolerance)``: the linear-interpolation ``p``-quantile of ``values`` in float64, and how far
    an implementation working in ``values``' dtype may be from it (see :func:`quantile_tolerance`)."""
    a = np.asarray(values.detach().cpu().double() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    a = a.reshape(-1)
    n = a.size
    pos = p * (n - 1)
    k = min(int(math.floor(pos)), n - 1)
    f = pos - k
    part = np.partition(a, sorted({max(k - 1, 0), k, min(k + 1, n - 1)}))
    s_lo, s_k, s_hi = part[max(k - 1, 0)], part[k], part[min(k + 1, n - 1)]
    q = s_k + f * (s_hi - s_k) if f > 0 else s_k
    dtype = values.dtype if isinstance(values, torch.Tensor) else torch.float64
    return float(q), quantile_tolerance(q, pos, s_hi - s_lo, dtype)


def quantile_tolerance(q: float, pos: float, gap: float, dtype: torch.dtype) -> float:
    """Rounding allowed in ``dtype``: a few units in the last place of ``Q``, plus the effect of
    rounding the position ``P`` (relative error ``eps``) times the gap between the neighbouring order
    statistics (``P`` taken in float32 moves ``Q`` along that gap)."""
    eps = torch.finfo(dtype).eps
    return 4 * eps * (abs(q) + max(pos, 1.0) * gap) + 1e-300


def kept_by_rule(n: int, p: float) -> int:
    """``n - 1 - floor(p (n - 1))`` with the decimal ``p`` taken exactly (fractions, no rounding)."""
    return n - 1 - math.floor(Fraction(str(p)) * (n - 1))


def check_mask_against_formula(mask: torch.Tensor, abs_z64: np.ndarray, q: float, band: float,
                               max_ambiguous: int = 2) -> None:
    """``mask == (|z| > Q)`` except at entries within ``band`` of ``Q`` (rounding distance), and few such."""
    expected = abs_z64 > q
    ambiguous = np.abs(abs_z64 - q) <= band
    got = mask.cpu().numpy().reshape(abs_z64.shape)
    assert np.array_equal(got[~ambiguous], expected[~ambiguous])
    assert ambiguous.sum() <= max_ambiguous, "too many entries at the threshold: the comparison would say little"


def numpy_abs_z(g: torch.Tensor) -> np.ndarray:
    """|z| = |g - mean| / (unbiased std + 1e-12), in float64 numpy."""
    a = g.detach().double().numpy()
    return np.abs((a - a.mean()) / (a.std(ddof=1) + 1e-12))


# --- the threshold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_quantile_matches_formula_and_torch_quantile(dtype):
    """selection_quantile vs the float64 numpy formula, and vs torch.quantile, within the dtype's rounding."""
    gen = torch.Generator().manual_seed(0)
    sizes = list(range(1, 40)) + [81, 97, 216, 1000, 2304, 4097, 36864]
    for n in sizes:
        x = torch.randn(n, generator=gen, dtype=dtype).abs()
        for q in (0.0, 0.01, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0):
            expected, tol = formula_quantile(x, q)
            got = float(selection_quantile(x, q))
            assert abs(got - expected) <= tol, (n, q, got, expected, tol)
            assert abs(float(torch.quantile(x, q)) - got) <= 2 * tol, (n, q)


def test_selection_quantile_ties_rows_and_nan():
    """Ties and batched rows follow the formula row by row; a row with NaN gives NaN (as torch.quantile)."""
    x = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    for q in (0.2, 0.5, 0.95):
        got = selection_quantile(x, q)
        for row, value in zip(x, got):
            expected, tol = formula_quantile(row, q)
            assert abs(float(value) - expected) <= tol
        torch.testing.assert_close(got, torch.quantile(x, q, dim=-1))
    y = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    for q in (0.1, 0.95):
        assert math.isnan(float(selection_quantile(y, q)))


def test_quantile_position_is_the_formula_and_rejects_bad_level():
    """(k, k+1, f) of P = q (n - 1) by hand; q outside [0, 1] and an empty input are refused."""
    assert quantile_position(0.95, 216) == (204, 205, pytest.approx(0.25, abs=1e-5))
    assert quantile_position(0.95, 81) == (76, 76, 0.0)  # 0.95 * 80 = 76 exactly: the threshold is s[76]
    assert quantile_position(0.5, 5, torch.float64) == (2, 2, 0.0)
    with pytest.raises(ValueError, match="q must be"):
        quantile_position(1.5, 10)
    with pytest.raises(ValueError, match="empty"):
        quantile_position(0.5, 0)


def test_tensor_beyond_two_to_the_24_entries():
    """16.8M entries (beyond 2**24, where the position is taken in float64), as one ZSharp weight: the
    threshold vs the numpy formula, the entries the ascent moves vs |z| > that threshold (except entries
    within rounding distance), about 5 % kept, and a perturbation of norm rho."""
    shape = (4100, 4100)
    n = shape[0] * shape[1]
    assert n > 2**24
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    abs_z = layer_zscores(g).abs()
    expected, tol = formula_quantile(abs_z, 0.95)
    w = torch.nn.Parameter(torch.zeros(shape))
    w.grad = g
    opt = ZSharp([w], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    stats = opt.mask_stats.iloc[0]
    assert abs(stats["threshold"] - expected) <= tol
    moved = w.detach() != 0
    check_mask_against_formula(moved, abs_z.double().numpy(), expected, tol, max_ambiguous=n // 100_000)
    assert stats["numel"] == n and stats["kept"] == int(moved.sum())
    assert 0.049 * n < stats["kept"] <= 0.05 * n + 1
    assert abs(float(w.detach().norm()) - 0.05) < 1e-6


# --- what the rule keeps ---------------------------------------------------------------------------
KEPT_SIZES = [3, 21, 22, 81, 100, 216, 1000, 2999, 3001, 4096, 36864]


@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_strict_rule_keeps_n_minus_1_minus_floor_p_n_minus_1(p):
    """The documented count, independently of sharpscope: numpy's linear-interpolation quantile of n
    distinct values and a strict comparison keep n - 1 - floor(p (n - 1)) of them (exact fractions)."""
    rng = np.random.default_rng(7)
    for n in KEPT_SIZES:
        values = rng.permutation(n) * 0.37 + 1.0  # distinct, well separated
        kept = int((values > np.quantile(values, p)).sum())
        assert kept == kept_by_rule(n, p), (n, p, kept)
    # The examples the docs give: more than 5 % of small tensors.
    assert (kept_by_rule(22, 0.95), kept_by_rule(216, 0.95), kept_by_rule(81, 0.95)) == (2, 11, 4)
    assert kept_by_rule(216, 0.95) / 216 > 0.05


@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zscore_mask_keeps_the_documented_count(p, dtype):
    """zscore_mask keeps exactly n - 1 - floor(p (n - 1)) entries (the rule's count, by exact fractions)
    when |z| has no tie at the threshold (s[k] < s[k+1]; ties elsewhere cannot change the count). With
    '>=' instead of '>', sizes like 21 and 81 (p (n - 1) an integer) would keep one more."""
    gen = torch.Generator().manual_seed(11)
    for n in KEPT_SIZES:
        g = torch.randn(n, 1, generator=gen, dtype=dtype)
        abs_z = layer_zscores(g).abs().reshape(-1).numpy()
        k = math.floor(Fraction(str(p)) * (n - 1))
        around = np.partition(abs_z, [k, k + 1])[k : k + 2]
        assert around[0] < around[1], "pick another seed: |z| must not tie at the threshold"
        assert int(zscore_mask(g, p).kept) == kept_by_rule(n, p), (n, p)


# --- Z-scores and masks ----------------------------------------------------------------------------
def test_layer_zscores_formula():
    """z = (g - mean) / (unbiased std + 1e-12), checked against numpy."""
    g = torch.randn(7, 9, dtype=torch.float64)
    a = g.numpy()
    expected = (a - a.mean()) / (a.std(ddof=1) + 1e-12)
    np.testing.assert_allclose(layer_zscores(g).numpy(), expected, rtol=1e-12)


def test_zscore_mask_strict_and_reference():
    """mask = |z| > Q_p(|z|) with z and Q from the numpy formula in float64: equal except at entries within
    float32 rounding distance of the threshold (for (3, 7), P = 0.95 * 20 = 19 is an entry); threshold
    within rounding of the formula and of torch.quantile."""
    for shape in [(16, 3, 3, 3), (10, 64), (33, 7), (3, 7)]:
        g = torch.randn(shape)
        abs_z64 = numpy_abs_z(g)
        expected, tol = formula_quantile(abs_z64, 0.95)
        band = 8 * torch.finfo(torch.float32).eps * float(abs_z64.max())  # float32 z and Q vs float64
        f = zscore_mask(g, 0.95)
        assert abs(float(f.threshold) - expected) <= band + tol
        abs_z32 = layer_zscores(g).abs().flatten()
        assert abs(float(torch.quantile(abs_z32, 0.95)) - float(f.threshold)) <= band
        check_mask_against_formula(f.mask, abs_z64, expected, band)
        assert int(f.kept) == int(f.mask.sum())


def test_zscore_mask_edge_cases():
    """Constant gradient, single entry and all zeros keep nothing (ties / NaN std); NaN grads too."""
    for g in (torch.full((4, 5), 0.1), torch.zeros(3, 3), torch.tensor([[2.0]])):
        f = zscore_mask(g, 0.95)
        assert int(f.kept) == 0 and not bool(f.mask.any())
    g = torch.randn(4, 5)
    g[1, 2] = float("nan")
    f = zscore_mask(g, 0.95)
    assert int(f.kept) == 0 and math.isnan(float(f.threshold))


def test_zscore_mask_bad_percentile():
    """Percentile outside (0, 1) is refused with the argument named."""
    for p in (0.0, 1.0, -0.1, 95):
        with pytest.raises(ValueError, match="percentile"):
            zscore_mask(torch.randn(3, 3), p)
    with pytest.raises(ValueError, match="scope"):
        zscore_masks([torch.randn(3, 3)], 0.9, scope="layer")


def test_global_scope_pools_per_tensor_scores():
    """scope='global': one threshold, the numpy formula over the concatenated per-tensor |z| (float64);
    each tensor's mask is |z| > it, except at entries within float32 rounding distance."""
    grads = [torch.randn(8, 4), torch.randn(5, 5, 3), torch.randn(2, 30)]
    absz = [numpy_abs_z(g) for g in grads]
    pooled = np.concatenate([a.reshape(-1) for a in absz])
    expected, tol = formula_quantile(pooled, 0.9)
    band = 8 * torch.finfo(torch.float32).eps * float(pooled.max())
    filters = zscore_masks(grads, 0.9, scope="global")
    for f, a in zip(filters, absz):
        assert abs(float(f.threshold) - expected) <= band + tol
        check_mask_against_formula(f.mask, a, expected, band)
    assert len({float(f.threshold) for f in filters}) == 1
