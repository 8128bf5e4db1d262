"""ZSharp's filter maths (sharpscope.optim.zscore) against torch.quantile, sorting and hand formulas."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_quantile_equals_torch_quantile_bitwise(dtype):
    """selection_quantile vs torch.quantile (linear interpolation): identical bits, many sizes and levels."""
    gen = torch.Generator().manual_seed(0)
    sizes = list(range(1, 40)) + [97, 1000, 2304, 4097, 36864]
    for n in sizes:
        x = torch.randn(n, generator=gen, dtype=dtype).abs()
        for q in (0.0, 0.01, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0):
            expected = torch.quantile(x, q)
            got = selection_quantile(x, q)
            assert torch.equal(got, expected), (n, q, got, expected)


def test_selection_quantile_ties_rows_and_nan():
    """Ties, batched rows and NaN propagation behave like torch.quantile(dim=-1)."""
    x = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    for q in (0.2, 0.5, 0.95):
        assert torch.equal(selection_quantile(x, q), torch.quantile(x, q, dim=-1))
    y = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    for q in (0.1, 0.95):
        assert math.isnan(float(selection_quantile(y, q))) and math.isnan(float(torch.quantile(y, q)))


def test_quantile_position_rejects_bad_level():
    """q outside [0, 1] and an empty input are refused with the argument named."""
    with pytest.raises(ValueError, match="q must be in"):
        quantile_position(1.5, 10)
    with pytest.raises(ValueError, match="empty"):
        quantile_position(0.5, 0)


def _sorted_reference_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Sort the whole tensor and interpolate between the order statistics at q*(n-1) (float64)."""
    v = torch.sort(x.reshape(-1)).values
    pos = q * (v.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return torch.lerp(v[lo], v[hi], pos - lo)


def test_twenty_million_element_tensor():
    """20M entries (torch.quantile refuses > 2**24): the selection equals a full sort + interpolation.

    The same tensor as a ZSharp weight: the mask it applies equals |z| > that sorted-reference
    threshold, and the perturbation has norm rho.
    """
    n = 20_000_000
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(4000, 5000, generator=gen)
    with pytest.raises(RuntimeError):
        torch.quantile(g.reshape(-1), 0.95)
    abs_z = layer_zscores(g).abs()
    expected = _sorted_reference_quantile(abs_z, 0.95)
    got = zscore_mask(g, 0.95)
    assert torch.equal(got.threshold, expected)
    assert int(got.kept) == int((abs_z > expected).sum())
    assert 0.049 * n < int(got.kept) <= 0.05 * n
    # Full optimizer on a 20M-element weight.
    w = torch.nn.Parameter(torch.zeros(4000, 5000))
    w.grad = g
    opt = ZSharp([w], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    e = w.detach()
    assert torch.equal(e != 0, abs_z > expected)
    assert abs(float(e.norm()) - 0.05) < 1e-6
    stats = opt.mask_stats.iloc[0]
    assert stats["numel"] == n and stats["kept"] == int(got.kept)


def test_layer_zscores_formula():
    """z = (g - mean) / (unbiased std + 1e-12), checked against numpy."""
    g = torch.randn(7, 9, dtype=torch.float64)
    a = g.numpy()
    expected = (a - a.mean()) / (a.std(ddof=1) + 1e-12)
    np.testing.assert_allclose(layer_zscores(g).numpy(), expected, rtol=1e-12)


def test_zscore_mask_strict_and_reference():
    """mask = |z| > torch.quantile(|z|, p) (strict), at most 5 % kept; threshold in Z units."""
    # (3, 7): 0.95 * 20 = 19 exactly, the threshold is an entry and strictness shows.
    for shape in [(16, 3, 3, 3), (10, 64), (33, 7), (3, 7)]:
        g = torch.randn(shape)
        z = (g - g.mean()) / (g.std() + 1e-12)
        tau = torch.quantile(z.abs().flatten(), 0.95)
        f = zscore_mask(g, 0.95)
        assert torch.equal(f.mask, z.abs() > tau)
        assert torch.equal(f.threshold, tau)
        assert int(f.kept) == int((z.abs() > tau).sum()) <= 0.05 * g.numel() + 1


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
    """scope='global': one torch.quantile over the concatenated per-tensor |z|; strict mask per tensor."""
    grads = [torch.randn(8, 4), torch.randn(5, 5, 3), torch.randn(2, 30)]
    absz = [((g - g.mean()) / (g.std() + 1e-12)).abs() for g in grads]
    tau = torch.quantile(torch.cat([a.flatten() for a in absz]), 0.9)
    for f, a in zip(zscore_masks(grads, 0.9, scope="global"), absz):
        assert torch.equal(f.threshold, tau)
        assert torch.equal(f.mask, a > tau)
