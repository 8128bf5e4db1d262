"""Tests of sharpscope.analysis.gradients (per-layer gradient Z-score distributions)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from sharpscope.analysis.gradients import ZScoreResult, gradient_zscores
from sharpscope.errors import UserInputError

SHAPE = (100, 250)  # 25,000 entries per planted gradient
N_BATCHES = 8  # 200,000 Z-scores pooled


class Planted(nn.Module):
    """Loss = <W, x> for the single input ``x``: the gradient of W is exactly ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(SHAPE, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum(dim=(1, 2)) + self.bias


def linear_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def planted_batches(draw, n_batches: int = N_BATCHES, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [(torch.as_tensor(draw(rng, SHAPE))[None], torch.zeros(1)) for _ in range(n_batches)]


def reference_z(g: np.ndarray) -> np.ndarray:
    """The official code's Z-score, written out in numpy: (g - mean) / (std_{N-1} + 1e-12)."""
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    return (g - g.mean()) / (g.std(ddof=1) + 1e-12)


def binomial_tol(p: float, n: int) -> float:
    """Five standard errors of a fraction estimated from n draws."""
    return 5 * math.sqrt(p * (1 - p) / n)


def test_gaussian_plant_matches_normal_theory():
    """Gaussian gradients: excess kurtosis ~ 0, skewness ~ 0, P(|z|>t) ~ erfc(t/sqrt2) (4.55 % at 2),
    threshold ~ the normal 97.5 % quantile; against normal theory with 5-standard-error bounds."""
    batches = planted_batches(lambda rng, s: rng.normal(3.0, 0.01, s))
    df = gradient_zscores(Planted(), linear_loss, batches, progress=False).to_dataframe()
    row = df.set_index("layer").loc["weight"]
    n = N_BATCHES * SHAPE[0] * SHAPE[1]
    assert abs(row["excess_kurtosis"]) < 5 * math.sqrt(24 / n)
    assert abs(row["skewness"]) < 5 * math.sqrt(6 / n)
    assert row["gaussian_p_abs_z_gt_2"] == pytest.approx(0.0455003, abs=1e-6)
    for t in (2, 3, 4):
        p = math.erfc(t / math.sqrt(2))
        assert abs(row[f"p_abs_z_gt_{t}"] - p) < binomial_tol(p, n)
    assert row["gaussian_threshold"] == pytest.approx(stats.norm.ppf(0.975), rel=1e-12)
    assert abs(row["threshold"] - stats.norm.ppf(0.975)) < 0.02


def test_laplace_and_student_t_plants_have_their_known_heavier_tails():
    """Laplace: excess kurtosis 3 and P(|z|>t) = exp(-t sqrt2); Student-t(5): P(|z|>t) =
    2 sf_t5(t sqrt(5/3)); both against closed-form values, heavier than the Gaussian column."""
    n = N_BATCHES * SHAPE[0] * SHAPE[1]
    lap = gradient_zscores(Planted(), linear_loss, planted_batches(lambda rng, s: rng.laplace(0, 1, s)),
                           progress=False).to_dataframe().set_index("layer").loc["weight"]
    # sd of the sample kurtosis of a Laplace law: sqrt((mu8 - mu4^2) / sigma^8 / n) = sqrt(2484 / n).
    assert abs(lap["excess_kurtosis"] - 3.0) < 5 * math.sqrt(2484 / n)
    for t in (2, 3, 4):
        p = math.exp(-t * math.sqrt(2))
        assert abs(lap[f"p_abs_z_gt_{t}"] - p) < binomial_tol(p, n)
        assert lap[f"p_abs_z_gt_{t}"] > lap[f"gaussian_p_abs_z_gt_{t}"]
    st = gradient_zscores(Planted(), linear_loss, planted_batches(lambda rng, s: rng.standard_t(5, s), seed=1),
                          progress=False).to_dataframe().set_index("layer").loc["weight"]
    for t in (2, 3, 4):
        p = 2 * stats.t.sf(t * math.sqrt(5 / 3), df=5)
        assert abs(st[f"p_abs_z_gt_{t}"] - p) < binomial_tol(p, n) + 2e-4  # + sample-std estimation error
    assert st["p_abs_z_gt_4"] > 20 * st["gaussian_p_abs_z_gt_4"]


def test_statistics_equal_numpy_scipy_on_the_same_z():
    """Per-batch and pooled moments, histogram, tail fractions and threshold against numpy/scipy
    (np.histogram, scipy.stats.skew/kurtosis, np.quantile) applied to Z-scores computed in the test."""
    batches = planted_batches(lambda rng, s: rng.gamma(2.0, 1.0, s), n_batches=3)
    edges = np.linspace(-3, 5, 33)
    res = gradient_zscores(Planted(), linear_loss, batches, bins=edges, percentile=0.9, tails=(1.5, 2.5),
                           progress=False)
    zs = [reference_z(x[0].numpy()) for x, _ in batches]
    per_batch = res.to_dataframe("batch")
    for b, z in enumerate(zs):
        row = per_batch[(per_batch["batch"] == b) & (per_batch["layer"] == "weight")].iloc[0]
        assert row["skewness"] == pytest.approx(stats.skew(z), rel=1e-9)
        assert row["excess_kurtosis"] == pytest.approx(stats.kurtosis(z), rel=1e-9)
        assert row["std"] == pytest.approx(z.std(ddof=1), rel=1e-9)
        assert row["p_abs_z_gt_1_5"] == pytest.approx(np.mean(np.abs(z) > 1.5), abs=1e-12)
        assert row["threshold"] == pytest.approx(np.quantile(np.abs(z), 0.9), rel=1e-9)
        counts = res.dataset["counts"].sel(layer="weight").values[b]
        np.testing.assert_array_equal(counts, np.histogram(z, edges)[0])
        assert res.dataset["below"].sel(layer="weight").values[b] == np.sum(z < edges[0])
        assert res.dataset["above"].sel(layer="weight").values[b] == np.sum(z > edges[-1])
    pooled = res.to_dataframe().set_index("layer").loc["weight"]
    allz = np.concatenate(zs)
    assert pooled["skewness"] == pytest.approx(stats.skew(allz), rel=1e-8)
    assert pooled["excess_kurtosis"] == pytest.approx(stats.kurtosis(allz), rel=1e-8)
    assert pooled["p_abs_z_gt_2_5"] == pytest.approx(np.mean(np.abs(allz) > 2.5), abs=1e-12)
    hist = res.histogram_dataframe()
    h = hist[hist["layer"] == "weight"]
    np.testing.assert_array_equal(h["count"].to_numpy(), np.histogram(allz, edges)[0])
    inside = np.mean((allz >= edges[0]) & (allz <= edges[-1]))
    assert float((h["density"] * (h["bin_right"] - h["bin_left"])).sum()) == pytest.approx(inside, rel=1e-12)


def test_full_data_uses_the_gradient_of_the_mean_loss():
    """full_data=True analyses the batch-size-weighted mean gradient (unequal batches); checked against
    the Z-scores of the concatenated-data gradient written in the test."""
    rng = np.random.default_rng(3)
    xs = [torch.as_tensor(rng.normal(size=(m, *SHAPE))) for m in (1, 3)]
    batches = [(x, torch.zeros(len(x))) for x in xs]
    res = gradient_zscores(Planted(), linear_loss, batches, full_data=True, progress=False)
    assert res.n_batches == 1 and res.settings["full_data"]
    z = reference_z(torch.cat(xs).mean(dim=0).numpy())
    row = res.to_dataframe().set_index("layer").loc["weight"]
    assert row["excess_kurtosis"] == pytest.approx(stats.kurtosis(z), rel=1e-9)
    assert row["threshold"] == pytest.approx(np.quantile(np.abs(z), 0.95), rel=1e-9)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 4)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(h))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def test_model_unchanged_deterministic_and_unused_tensor_left_out():
    """Parameters, buffers, .grad and train flags are bit-for-bit as before; two calls agree exactly;
    the layer the loss does not use is left out with a warning (compared with a snapshot taken before)."""
    model = SmallNet().train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = _snapshot(model)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    with pytest.warns(RuntimeWarning, match="unused.weight"):
        a = gradient_zscores(model, nn.functional.cross_entropy, data, progress=False)
    with pytest.warns(RuntimeWarning):
        b = gradient_zscores(model, nn.functional.cross_entropy, data, progress=False)
    after = _snapshot(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert all((g0 is None and g1 is None) or torch.equal(g0, g1) for g0, g1 in zip(before[1], after[1]))
    assert before[2] == after[2]
    assert a.layers == ["conv.weight", "fc.weight"]
    pd.testing.assert_frame_equal(a.to_dataframe("batch"), b.to_dataframe("batch"))
    assert a.settings["model_fingerprint"] == b.settings["model_fingerprint"]


def test_save_load_round_trip(tmp_path):
    """A saved result reads back with identical tables and settings; another kind of file is refused."""
    model = SmallNet().eval()
    data = (torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    with pytest.warns(RuntimeWarning):
        res = gradient_zscores(model, nn.functional.cross_entropy, data, include="all", progress=False)
    assert "bn.weight" in res.layers and "fc.bias" in res.layers
    path = res.save(tmp_path / "z.nc")
    back = ZScoreResult.load(path)
    pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe())
    pd.testing.assert_frame_equal(back.histogram_dataframe("batch"), res.histogram_dataframe("batch"))
    assert back.settings == res.settings
    (tmp_path / "other.nc").write_bytes(b"not netcdf")
    with pytest.raises(UserInputError, match="not a sharpscope result"):
        ZScoreResult.load(tmp_path / "other.nc")


@pytest.mark.parametrize("percentile", [0.0, 1.0, -0.1, 1.5, float("nan"), "high"])
def test_bad_percentile(percentile):
    """A percentile outside the open interval (0, 1) is refused with a message naming the range."""
    with pytest.raises(UserInputError, match=r"percentile must be in the open interval \(0, 1\)"):
        gradient_zscores(Planted(), linear_loss, planted_batches(lambda r, s: r.normal(size=s), 1),
                         percentile=percentile, progress=False)


def test_bad_models_and_settings():
    """No tensor with ndim > 1, bad bins or tails: one clear UserInputError each."""
    model = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(UserInputError, match="ndim > 1"):
        gradient_zscores(model, nn.functional.mse_loss, (torch.randn(5, 4), torch.randn(5, 4)), progress=False)
    data = planted_batches(lambda r, s: r.normal(size=s), 1)
    with pytest.raises(UserInputError, match="bins"):
        gradient_zscores(Planted(), linear_loss, data, bins=[1.0, 0.0], progress=False)
    with pytest.raises(UserInputError, match="tails"):
        gradient_zscores(Planted(), linear_loss, data, tails=(-1,), progress=False)
    with pytest.raises(UserInputError, match="level"):
        gradient_zscores(Planted(), linear_loss, data, progress=False).to_dataframe("epoch")


def test_constant_gradient_layer_warns_instead_of_silent_nan():
    """A tensor whose gradient is constant has all Z-scores 0: a warning names it (NaN moments)."""

    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=1) * self.weight.sum()

    with pytest.warns(RuntimeWarning, match="weight is constant"):
        res = gradient_zscores(Const(), linear_loss, (torch.ones(2, 5), torch.zeros(2)), progress=False)
    row = res.to_dataframe().iloc[0]
    assert math.isnan(row["excess_kurtosis"]) and row["p_abs_z_gt_2"] == 0.0


def test_non_finite_weights_and_wrong_data_are_one_line():
    """Issue 11: NaN/inf weights are refused up front naming the tensor (they used to give a
    FloatingPointError traceback), and a model that cannot run on the data gives one
    UserInputError line (it used to be a RuntimeError from inside the gradient pass)."""
    model = SmallNet().eval()
    data = (torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))
    with pytest.raises(UserInputError, match="cannot run on this data"):
        gradient_zscores(model, nn.functional.cross_entropy, (torch.randn(4, 10), data[1]), progress=False)
    with torch.no_grad():
        model.bn.running_var[2] = float("inf")
    with pytest.raises(UserInputError, match=r"non-finite.*bn\.running_var") as err:
        gradient_zscores(model, nn.functional.cross_entropy, data, progress=False)
    assert "\n" not in str(err.value)


def test_incomplete_file_is_one_line(tmp_path):
    """A Z-score file of the right kind without its histogram is refused in one line (not KeyError)."""
    from sharpscope.analysis.results import read_dataset, write_dataset

    res = gradient_zscores(Planted(), linear_loss, planted_batches(lambda r, s: r.normal(size=s), 1),
                           progress=False)
    ds, meta = read_dataset(res.save(tmp_path / "z.nc"), "gradient_zscores")
    write_dataset(ds.drop_vars("counts"), tmp_path / "bad.nc", "gradient_zscores", meta)
    with pytest.raises(UserInputError, match="lacks 'counts'"):
        ZScoreResult.load(tmp_path / "bad.nc")
