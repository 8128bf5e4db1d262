"""Every optimizer against an independent plain-loop reference written from REFERENCE.md.

The references below recompute the ascent e(w) tensor by tensor with the textbook formulas
(ZSharp's threshold by the linear-interpolation formula in float64 numpy: the official code calls
torch.quantile, whose last bits change between torch versions), run the two passes by hand and step
a separate copy of the base optimizer. Several full training steps of a small CNN with BatchNorm and biases must agree
with the library to 1e-6, under SGD with momentum and under Adam.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.optim import ASAM, SAM, FriendlySAM, ZSharp

N_STEPS = 4


def small_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1)
    return _layers().to(dtype)


def _layers() -> nn.Module:
    return nn.Sequential(
        # No bias before a BatchNorm: its true gradient is 0, so Adam would amplify rounding noise.
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 9),
        nn.ReLU(),
        # 81 entries: 0.95 * 80 = 76 exactly, so the threshold IS an entry and ">" vs ">=" matters.
        nn.Linear(9, 9),
    )


def batches(n: int = N_STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(12, 3, 6, 6, generator=gen), torch.randint(0, 5, (12,), generator=gen)) for _ in range(n)]


def formula_quantile(values: torch.Tensor, p: float) -> float:
    """s[k] + f (s[k+1] - s[k]) with s sorted, k = floor(p (n - 1)), f = p (n - 1) - k (float64)."""
    s = np.sort(values.detach().double().flatten().numpy())
    pos = p * (s.size - 1)
    k = math.floor(pos)
    return float(s[k] + (pos - k) * (s[min(k + 1, s.size - 1)] - s[k]))


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.norm()) ** 2 for t in tensors))


# --- reference ascent directions (plain per-tensor loops) -------------------------------------
def ref_sam(named, grads, state, rho=0.05):
    gn = _norm(grads.values())
    return {n: rho * g / (gn + 1e-12) for n, g in grads.items()}


def ref_asam(named, grads, state, rho, eta, official):
    t = {}
    for n, g in grads.items():
        adapt = ("weight" in n) if official else True
        t[n] = named[n].detach().abs() + eta if adapt else torch.ones_like(g)
    eps = 1e-16 if official else 1e-12
    big_n = _norm([t[n] * g for n, g in grads.items()]) + eps
    return {n: rho * t[n] * t[n] * g / big_n for n, g in grads.items()}


def ref_fsam(named, grads, state, rho=0.05, sigma=1.0, lmbda=0.9):
    d = {}
    for n, g in grads.items():
        if n not in state:
            state[n] = g.clone()
            d[n] = g.clone()
        else:
            d[n] = g - sigma * state[n]
            state[n] = lmbda * state[n] + (1 - lmbda) * g
    dn = _norm(d.values())
    return {n: rho * v / (dn + 1e-12) for n, v in d.items()}


def ref_zsharp(named, grads, state, rho=0.05, pct=0.95, perturb_norm="tensor", scope="tensor"):
    gn = _norm(grads.values())
    absz = {}
    for n, g in grads.items():
        if g.ndim > 1:
            absz[n] = ((g - g.mean()) / (g.std() + 1e-12)).abs()
    if scope == "global":
        pooled = torch.cat([a.flatten() for a in absz.values()])
        tau = {n: formula_quantile(pooled, pct) for n in absz}
    else:
        tau = {n: formula_quantile(a, pct) for n, a in absz.items()}
    d, fallback = {}, {}
    for n, g in grads.items():
        if n in absz:
            gf = g * (absz[n].double() > tau[n])
            fallback[n] = float(gf.norm()) == 0.0
            d[n] = g if fallback[n] else gf
        else:
            d[n] = g
    if perturb_norm == "global":
        dn = _norm(d.values())
        return {n: rho * v / (dn + 1e-12) for n, v in d.items()}
    e = {}
    for n, v in d.items():
        if n in absz and not fallback[n]:
            e[n] = rho * v / (float(v.norm()) + 1e-12)
        else:
            e[n] = rho * v / (gn + 1e-12)
    return e


def reference_training(model, base_cls, base_kwargs, ascent, data):
    named = dict(model.named_parameters())
    base = base_cls(model.parameters(), **base_kwargs)
    state: dict = {}
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        base.zero_grad()
        loss_fn(model(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in named.items()}
        e = ascent(named, grads, state)
        saved = {n: p.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.add_(e[n])
        base.zero_grad()
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n])
        base.step()
    return model


def library_training(model, opt_factory, data, use_closure):
    opt = opt_factory(model)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        if use_closure:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
    return model


BASES = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adam": (torch.optim.Adam, {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 5e-5}),
}
# Adam divides by sqrt(v): for an entry whose gradient is nearly zero it turns last-bit float32
# differences of two correct implementations into visible steps, so Adam is compared in float64.
DTYPES = {"sgd_momentum": torch.float32, "adam": torch.float64}

CASES = {
    "sam": (lambda ps, b, kw: SAM(ps, b, rho=0.05, **kw), lambda *a: ref_sam(*a, rho=0.05)),
    "asam_official": (
        lambda ps, b, kw: ASAM(ps, b, rho=0.5, eta=0.01, **kw),
        lambda *a: ref_asam(*a, rho=0.5, eta=0.01, official=True),
    ),
    "asam_davda54": (
        lambda ps, b, kw: ASAM(ps, b, variant="davda54", **kw),
        lambda *a: ref_asam(*a, rho=2.0, eta=0.0, official=False),
    ),
    "fsam": (lambda ps, b, kw: FriendlySAM(ps, b, **kw), lambda *a: ref_fsam(*a)),
    "zsharp": (lambda ps, b, kw: ZSharp(ps, b, **kw), lambda *a: ref_zsharp(*a)),
    "zsharp_global_norm": (
        lambda ps, b, kw: ZSharp(ps, b, perturb_norm="global", **kw),
        lambda *a: ref_zsharp(*a, perturb_norm="global"),
    ),
    "zsharp_global_threshold": (
        lambda ps, b, kw: ZSharp(ps, b, threshold_scope="global", **kw),
        lambda *a: ref_zsharp(*a, scope="global"),
    ),
    "zsharp_global_both": (
        lambda ps, b, kw: ZSharp(ps, b, percentile=0.8, perturb_norm="global", threshold_scope="global", **kw),
        lambda *a: ref_zsharp(*a, pct=0.8, perturb_norm="global", scope="global"),
    ),
}


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_plain_loop_reference(case, base_name):
    """Library vs the plain-loop reference above (REFERENCE.md formulas): weights and BN buffers, 1e-6."""
    base_cls, base_kwargs = BASES[base_name]
    make_opt, ascent = CASES[case]
    dtype = DTYPES[base_name]
    data = [(x.to(dtype), y) for x, y in batches()]
    reference = reference_training(small_cnn(dtype), base_cls, base_kwargs, ascent, data)
    ours = library_training(
        small_cnn(dtype), lambda m: make_opt(m.named_parameters(), base_cls, base_kwargs), data, use_closure=False
    )
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    initial = small_cnn(dtype)
    moved = sum(float((a - b).detach().abs().max()) for a, b in zip(initial.parameters(), ours.parameters()))
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"


@pytest.mark.parametrize("case", ["sam", "zsharp", "fsam"])
def test_closure_step_equals_two_calls(case):
    """step(closure) runs exactly the two passes of first_step/second_step (compared bit for bit)."""
    base_cls, base_kwargs = BASES["sgd_momentum"]
    make_opt, _ = CASES[case]
    data = batches()
    a = library_training(small_cnn(), lambda m: make_opt(m.named_parameters(), base_cls, base_kwargs), data, False)
    b = library_training(small_cnn(), lambda m: make_opt(m.parameters(), base_cls, base_kwargs), data, True)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_closure_returns_pass1_loss():
    """The loss step(closure) returns is the loss at w (recomputed here before the step)."""
    model = small_cnn()
    x, y = batches(1)[0]
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.equal(opt.step(closure).detach(), expected)
