"""Worst-case and average-case sharpness against closed forms on a quadratic and on a trained net."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn

from sharpscope.analysis.sharpness import SharpnessResult, sharpness
from sharpscope.errors import UserInputError


class Quadratic(nn.Module):
    """loss = 1/2 (w - w*)^T A (w - w*) for every sample, w a (3, 4) matrix, A with a clear top gap."""

    def __init__(self, at_minimum: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
        eig = torch.cat([torch.tensor([6.0, 3.0], dtype=torch.float64), torch.linspace(2.0, 0.1, 10).double()])
        self.register_buffer("A", q @ torch.diag(eig) @ q.T)
        self.register_buffer("w_star", torch.randn(12, generator=g, dtype=torch.float64))
        offset = 0.0 if at_minimum else 0.05 * torch.randn(12, generator=g, dtype=torch.float64)
        self.w = nn.Parameter((self.w_star + offset).reshape(3, 4).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.w.reshape(-1) - self.w_star
        return (0.5 * d @ self.A @ d).expand(len(x))


def mean_out(out, _t):
    return out.mean()


QDATA = (torch.zeros(3, 1), torch.zeros(3))


def trust_region_max(g: np.ndarray, A: np.ndarray, rho: float) -> float:
    """max_{||e|| <= rho} g.e + 1/2 e.A.e for A positive definite, by the secular equation:
    e = (lam I - A)^-1 g with lam > lambda_max and ||e|| = rho."""
    lam, q = np.linalg.eigh(A)
    c = q.T @ g
    if np.linalg.norm(c) == 0:
        return 0.5 * rho**2 * lam[-1]
    norm = lambda mu: np.sqrt(np.sum(c**2 / (mu - lam) ** 2)) - rho  # noqa: E731
    mu = brentq(norm, lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0, xtol=1e-14)
    e = q @ (c / (mu - lam))
    return float(g @ e + 0.5 * e @ A @ e)


def quad_terms(model: Quadratic) -> tuple[np.ndarray, np.ndarray]:
    A = model.A.numpy()
    g = A @ (model.w.detach().reshape(-1) - model.w_star).numpy()
    return g, A


def test_worst_case_at_minimum_is_half_rho_squared_lambda_max():
    """At w = w*, S_max = rho^2 lambda_max / 2 with lambda_max from numpy.linalg.eigh."""
    model = Quadratic(at_minimum=True)
    rho = 0.3
    res = sharpness(model, mean_out, QDATA, rho=rho, kind="worst", steps=60)
    lam_max = np.linalg.eigvalsh(model.A.numpy())[-1]
    assert res.value == pytest.approx(0.5 * rho**2 * lam_max, rel=1e-4)
    assert res.perturbation_norm == pytest.approx(rho, rel=1e-9)
    assert res.base_loss == pytest.approx(0.0, abs=1e-20)
    assert np.all(np.diff(res.trace) >= 0)  # the best value found never decreases


def test_worst_case_with_linear_term_matches_trust_region_solution():
    """Away from w*, S_max = max_{||e||<=rho} g.e + e.A.e / 2, solved independently (secular equation)."""
    model = Quadratic(at_minimum=False, seed=3)
    rho = 0.2
    res = sharpness(model, mean_out, QDATA, rho=rho, kind="worst", steps=60)
    g, A = quad_terms(model)
    expected = trust_region_max(g, A, rho)
    assert res.value == pytest.approx(expected, rel=1e-5)
    assert expected > 0.5 * rho**2 * np.linalg.eigvalsh(A)[-1]  # the linear term matters here


def test_adaptive_worst_case_matches_scaled_trust_region():
    """adaptive=True: with T = diag(|w| + eta), S_max = max_{||u||<=rho} (Tg).u + u.(TAT).u / 2;
    the achieved ||T^-1 e|| is rho while ||e|| differs from it."""
    model = Quadratic(at_minimum=False, seed=4)
    rho, eta = 0.1, 0.01
    res = sharpness(model, mean_out, QDATA, rho=rho, kind="worst", adaptive=True, eta=eta, steps=80)
    g, A = quad_terms(model)
    t = np.abs(model.w.detach().reshape(-1).numpy()) + eta
    expected = trust_region_max(t * g, t[:, None] * A * t[None, :], rho)
    assert res.value == pytest.approx(expected, rel=1e-4)
    assert res.scaled_norm == pytest.approx(rho, rel=1e-9)
    assert res.perturbation_norm != pytest.approx(rho, rel=1e-2)


def test_average_case_matches_trace_formula():
    """E over u uniform on the rho-sphere of g.u + u.A.u / 2 = rho^2 tr(A) / (2 P); the estimate is
    within 4 standard errors of it and its stderr is that of the samples."""
    model = Quadratic(at_minimum=False, seed=5)
    rho = 0.5
    res = sharpness(model, mean_out, QDATA, rho=rho, kind="average", n_samples=400, seed=1)
    A = model.A.numpy()
    expected = rho**2 * np.trace(A) / (2 * A.shape[0])
    assert abs(res.value - expected) < 4 * res.stderr
    assert res.stderr == pytest.approx(np.std(res.trace, ddof=1) / math.sqrt(400))
    assert res.perturbation_norm == pytest.approx(rho)


def _trained_mlp():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x, y)


def test_trained_model_worst_at_least_average_at_least_zero_and_unchanged():
    """On a trained MLP: worst >= average >= 0 (plain and adaptive); the model is bit-for-bit
    unchanged afterwards; the same seed gives the same numbers."""
    model, data = _trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    for adaptive, rho in [(False, 0.5), (True, 0.5)]:
        worst = sharpness(model, F.cross_entropy, data, rho=rho, kind="worst", adaptive=adaptive, steps=10)
        avg = sharpness(model, F.cross_entropy, data, rho=rho, kind="average", adaptive=adaptive, n_samples=20)
        assert worst.value >= avg.value >= 0.0
        assert worst.scaled_norm <= rho * (1 + 1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    again = sharpness(model, F.cross_entropy, data, rho=0.5, kind="average", adaptive=True, n_samples=20)
    assert again.value == avg.value
    other = sharpness(model, F.cross_entropy, data, rho=0.5, kind="average", adaptive=True, n_samples=20, seed=9)
    assert other.value != avg.value


def test_ignore_biasbn_leaves_biases_out():
    """ignore='biasbn' perturbs only tensors with ndim > 1: the parameter list says so, and a model
    whose loss depends only on a bias has zero sharpness then."""
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.zero_()

    def bias_only(out, _t):
        return (model.bias.sum() - 1.0) ** 2 + 0 * out.mean()

    data = (torch.zeros(2, 3), torch.zeros(2))
    res = sharpness(model, bias_only, data, rho=0.1, kind="average", ignore="biasbn", n_samples=5)
    assert res.settings["parameters"] == ["weight"] and res.value == 0.0
    res_all = sharpness(model, bias_only, data, rho=0.1, kind="worst", ignore="none", steps=5)
    assert res_all.value > 0.0


def test_save_load_round_trip(tmp_path):
    """The result file gives back the number, the trace and the settings."""
    model = Quadratic(at_minimum=False)
    res = sharpness(model, mean_out, QDATA, rho=0.1, kind="worst", steps=5)
    back = SharpnessResult.load(res.save(tmp_path / "s.nc"))
    assert back.value == res.value and back.settings == res.settings
    np.testing.assert_array_equal(back.trace, res.trace)
    assert back.to_dataframe().loc[0, "kind"] == "worst"


def test_bad_input_is_refused():
    """rho <= 0, an unknown kind, zero steps, negative eta and empty data each give a clear error."""
    model = Quadratic(at_minimum=True)
    with pytest.raises(UserInputError, match="rho"):
        sharpness(model, mean_out, QDATA, rho=0.0)
    with pytest.raises(UserInputError, match="kind"):
        sharpness(model, mean_out, QDATA, kind="max")
    with pytest.raises(UserInputError, match="steps"):
        sharpness(model, mean_out, QDATA, steps=0)
    with pytest.raises(UserInputError, match="eta"):
        sharpness(model, mean_out, QDATA, adaptive=True, eta=-1.0)
    with pytest.raises(ValueError, match="empty"):
        sharpness(model, mean_out, [])


def test_antithetic_pairs_equal_the_eigen_sum_formula_with_a_smaller_error():
    """Issue 16: on a quadratic away from its minimum, L(w + e) - L(w) = g.e + e.A.e / 2, so a pair
    (+e, -e) keeps exactly e.A.e / 2: every pair sample lies between rho^2 lambda_min / 2 and
    rho^2 lambda_max / 2 (Rayleigh quotient), the mean is within 4 standard errors of the exact
    average increase rho^2 sum_i lambda_i / (2 P), and the standard error is smaller than that of
    plain draws even at the same number of loss evaluations (the noisy g.e term cancels)."""
    model = Quadratic(at_minimum=False, seed=5)
    with torch.no_grad():  # far enough from the minimum for the gradient term to matter
        model.w.add_(0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    rho = 0.5
    lam = np.linalg.eigvalsh(model.A.numpy())
    exact = rho**2 * lam.sum() / (2 * lam.size)
    pairs = sharpness(model, mean_out, QDATA, rho=rho, kind="average", n_samples=100, seed=3, antithetic=True)
    plain = sharpness(model, mean_out, QDATA, rho=rho, kind="average", n_samples=200, seed=3, antithetic=False)
    assert np.all(pairs.trace >= rho**2 * lam[0] / 2 - 1e-12)
    assert np.all(pairs.trace <= rho**2 * lam[-1] / 2 + 1e-12)
    assert np.any(plain.trace < rho**2 * lam[0] / 2)  # the first-order term shows in single draws
    assert abs(pairs.value - exact) < 4 * pairs.stderr
    assert pairs.stderr < plain.stderr
    assert pairs.settings["antithetic"] is True and plain.settings["antithetic"] is False
