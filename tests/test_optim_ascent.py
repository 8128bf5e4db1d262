"""zsharp_ascent, the pure function behind ZSharp.first_step, against a float64 numpy recomputation.

The reference below recomputes e(w) from REFERENCE.md's ZSharp rules in numpy (Z-scores, threshold
by the linear-interpolation formula, strict mask, per-tensor or global norm, SAM fallback) and the
statistics record (kept, threshold, norms, fallback) from the same arrays.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import UserInputError
from sharpscope.optim import ZSharp, zsharp_ascent


def formula_quantile(a: np.ndarray, p: float) -> float:
    """s[k] + f (s[k+1] - s[k]), s sorted, k = floor(p (n - 1)), f = p (n - 1) - k."""
    s = np.sort(a.reshape(-1))
    pos = p * (s.size - 1)
    k = math.floor(pos)
    return float(s[k] + (pos - k) * (s[min(k + 1, s.size - 1)] - s[k]))


def numpy_ascent(grads, rho, p, perturb_norm, scope):
    """(e per tensor, {index: (kept, threshold, ||g_t||, ||e_t||, fallback)}) in float64 numpy."""
    gs = [g.double().numpy() for g in grads]
    gnorm = math.sqrt(sum(float((g**2).sum()) for g in gs))
    absz = {i: np.abs((g - g.mean()) / (g.std(ddof=1) + 1e-12)) for i, g in enumerate(gs) if g.ndim > 1}
    if scope == "global":
        pooled = formula_quantile(np.concatenate([a.reshape(-1) for a in absz.values()]), p)
        tau = {i: pooled for i in absz}
    else:
        tau = {i: formula_quantile(a, p) for i, a in absz.items()}
    for i, a in absz.items():  # no entry at rounding distance of the threshold (a constant tensor: all tie)
        assert a.max() == a.min() or np.abs(a - tau[i]).min() > 1e-5 * tau[i]
    d, fallback = {}, {}
    for i, g in enumerate(gs):
        mask = absz[i] > tau[i] if i in absz else np.ones_like(g, dtype=bool)
        fallback[i] = i in absz and np.linalg.norm(g * mask) == 0
        d[i] = g if (i not in absz or fallback[i]) else g * mask
    if perturb_norm == "global":
        dn = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
        e = {i: rho[i] * v / (dn + 1e-12) for i, v in d.items()}
    else:
        e = {i: rho[i] * v / ((gnorm if i not in absz or fallback[i] else np.linalg.norm(v)) + 1e-12)
             for i, v in d.items()}
    stats = {i: (int((absz[i] > tau[i]).sum()), tau[i], np.linalg.norm(gs[i]), np.linalg.norm(e[i]), fallback[i])
             for i in absz}
    return [e[i] for i in range(len(gs))], stats


def gradients() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [
        torch.randn(6, 3, 3, 3, generator=gen),  # conv weight
        torch.randn(6, generator=gen),  # bias: never filtered
        torch.full((4, 5), 0.3),  # constant gradient: empty mask, SAM fallback
        torch.randn(10, 40, generator=gen) ** 3,  # heavy tails
    ]


@pytest.mark.parametrize("perturb_norm", ["tensor", "global"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_zsharp_ascent_matches_numpy_reference(perturb_norm, scope):
    """Perturbations and every field of the statistics record vs the float64 numpy recomputation."""
    grads = gradients()
    rho = [0.05, 0.1, 0.05, 0.2]
    ascent = zsharp_ascent(grads, rho, 0.9, perturb_norm=perturb_norm, threshold_scope=scope)
    expected, stats = numpy_ascent(grads, rho, 0.9, perturb_norm, scope)
    for got, want in zip(ascent.perturbations, expected):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-5, atol=1e-9)
    assert [s.index for s in ascent.filtered] == [0, 2, 3]
    for s in ascent.filtered:
        kept, tau, g_norm, e_norm, fallback = stats[s.index]
        assert s.numel == grads[s.index].numel() and int(s.kept) == kept
        assert bool(s.fallback) == fallback and s.fallback.dtype == torch.bool
        assert float(s.grad_norm) == pytest.approx(g_norm, rel=1e-6)
        assert float(s.perturbation_norm) == pytest.approx(e_norm, rel=1e-5)
        if not fallback:  # a constant gradient has |z| = 0 everywhere; its threshold is 0
            assert float(s.threshold) == pytest.approx(tau, rel=1e-5)
    assert float(ascent.grad_norm) == pytest.approx(math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads)))


def test_zsharp_ascent_is_pure_and_is_what_first_step_adds():
    """The gradients are left untouched, and ZSharp.first_step moves each weight by exactly the
    perturbation the function returns (same bits through add_to_, within rounding as w + e)."""
    grads = gradients()
    before = [g.clone() for g in grads]
    ascent = zsharp_ascent(grads, 0.05, 0.95)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)
    params = [nn.Parameter(torch.randn_like(g)) for g in grads]
    w0 = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ZSharp(params, torch.optim.SGD, lr=0.1).first_step()
    copies = [w.clone() for w in w0]
    ascent.add_to_(copies)
    for p, w, c, e in zip(params, w0, copies, ascent.perturbations):
        assert torch.equal(p.detach(), c)
        torch.testing.assert_close(p.detach(), w + e)


def test_global_threshold_with_nothing_to_filter():
    """threshold_scope='global' with only 1-D tensors: no threshold is taken, every tensor gets the SAM
    direction rho g / (||g|| + 1e-12) (checked by hand), and ZSharp's mask_stats is empty."""
    grads = [torch.randn(5), torch.randn(3)]
    ascent = zsharp_ascent(grads, 0.05, 0.95, threshold_scope="global")
    norm = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
    assert ascent.filtered == []
    for e, g in zip(ascent.perturbations, grads):
        torch.testing.assert_close(e, 0.05 * g / (norm + 1e-12))
    lin = nn.Linear(3, 1)
    opt = ZSharp([lin.bias], torch.optim.SGD, threshold_scope="global", lr=0.1)
    lin(torch.randn(4, 3)).sum().backward()
    opt.first_step()
    assert opt.mask_stats.empty


def test_zsharp_ascent_refuses_bad_input():
    """One clear ValueError per mistake, naming the argument."""
    grads = gradients()
    with pytest.raises(UserInputError, match="share one percentile"):
        zsharp_ascent(grads, 0.05, [0.9, 0.9, 0.95, 0.9], threshold_scope="global")
    with pytest.raises(UserInputError, match="rho must be one number or one per gradient"):
        zsharp_ascent(grads, [0.05, 0.1])
    with pytest.raises(ValueError, match="rho"):
        zsharp_ascent(grads, -0.1)
    with pytest.raises(ValueError, match="percentile"):
        zsharp_ascent(grads, 0.05, 1.0)
    with pytest.raises(ValueError, match="perturb_norm"):
        zsharp_ascent(grads, perturb_norm="layer")
    with pytest.raises(ValueError, match="at least one gradient"):
        zsharp_ascent([])
