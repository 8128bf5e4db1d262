"""Directions for loss-landscape slices: normalisation, ignored tensors, interpolation, trajectory PCA."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from torch import nn

from sharpscope.analysis.directions import (
    Direction,
    eigen_directions,
    interpolation_direction,
    normalize_direction,
    random_directions,
    trajectory_directions,
)
from sharpscope.errors import UserInputError


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
        nn.LayerNorm(5), nn.Linear(5, 3),
    )


def test_filter_normalisation_matches_weight_filters_and_zeroes_biasbn():
    """Each output filter of a conv kernel / row of a Linear weight has the norm of the matching
    weight filter (computed here by hand); biases and norm-layer parameters are exactly zero."""
    model = small_cnn()
    (d,) = random_directions(model, n=1, normalization="filter", ignore="biasbn", seed=3)
    assert list(d) == [n for n, _ in model.named_parameters()]
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            for f in range(w.shape[0]):
                torch.testing.assert_close(d[name][f].norm(), w[f].detach().norm(), rtol=1e-5, atol=1e-7)


def test_layer_and_model_normalisation_and_ignore_none():
    """'layer': each tensor has its weight tensor's norm; 'model': the whole direction has the
    norm of all weights; ignore='none' keeps 1-D tensors (one filter each) — norms by hand."""
    model = small_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # LayerNorm/BatchNorm biases start at zero: give them a norm
    (dl,) = random_directions(model, 1, normalization="layer", ignore="none", seed=1)
    for name, w in model.named_parameters():
        torch.testing.assert_close(dl[name].norm(), w.detach().norm(), rtol=1e-5, atol=1e-7)
    (dm,) = random_directions(model, 1, normalization="model", ignore="none", seed=1)
    w_norm = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters())))
    assert dm.norm() == pytest.approx(w_norm, rel=1e-5)
    (dn,) = random_directions(model, 1, normalization="none", ignore="none", seed=1)
    gen = torch.Generator().manual_seed(1)
    first = next(iter(model.parameters()))
    raw = torch.randn(first.shape, generator=gen, dtype=torch.float64).float()
    torch.testing.assert_close(dn[next(iter(dn))], raw)
    (df,) = random_directions(model, 1, normalization="filter", ignore="none", seed=1)
    torch.testing.assert_close(df["1.weight"].norm(), model[1].weight.detach().norm())


def test_same_seed_same_directions_other_seed_differs():
    """Determinism: two calls with one seed are identical; another seed gives another draw."""
    model = small_cnn()
    a = random_directions(model, n=2, seed=7)
    b = random_directions(model, n=2, seed=7)
    c = random_directions(model, n=2, seed=8)
    for da, db, dc in zip(a, b, c):
        assert da.fingerprint() == db.fingerprint()
        assert da.fingerprint() != dc.fingerprint()
    assert abs(a[0].dot(a[1])) < 0.5 * a[0].norm() * a[1].norm()  # two draws, not one repeated


def test_bad_arguments_are_refused():
    """Clear errors for an unknown normalisation/ignore, n < 1, and a direction for another model."""
    model = small_cnn()
    with pytest.raises(UserInputError, match="normalization"):
        random_directions(model, normalization="filters")
    with pytest.raises(UserInputError, match="ignore"):
        random_directions(model, ignore="bn")
    with pytest.raises(UserInputError, match="n must"):
        random_directions(model, n=0)
    other = nn.Linear(3, 3)
    (d,) = random_directions(other, 1)
    with pytest.raises(UserInputError, match="does not have"):
        normalize_direction(d, model)


def test_interpolation_direction_is_the_difference():
    """w_b - w_a entry by entry (checked by hand), buffers only when asked; other shapes refused."""
    a, b = small_cnn(), small_cnn()
    b[1].running_mean.add_(1.0)
    d = interpolation_direction(a, b)
    for name, pa in a.named_parameters():
        torch.testing.assert_close(d[name], dict(b.named_parameters())[name] - pa)
    assert "1.running_mean" not in d
    db = interpolation_direction(a, b, include_buffers=True)
    torch.testing.assert_close(db["1.running_mean"], torch.ones(6))
    assert "1.num_batches_tracked" not in db
    with pytest.raises(UserInputError, match="same architecture"):
        interpolation_direction(a, nn.Linear(2, 2))


def test_trajectory_pca_matches_sklearn_and_recovers_the_plane():
    """Checkpoints on a known plane through the final weights: the explained variance matches
    sklearn's PCA, the directions span the plane, and coordinates reproduce the path."""
    torch.manual_seed(0)
    final = nn.Linear(6, 4)
    numel = sum(p.numel() for p in final.parameters())
    basis, _ = torch.linalg.qr(torch.randn(numel, 2, dtype=torch.float64))
    t = np.linspace(0, 1, 9)
    path = np.stack([3 * (1 - t) ** 2, np.sin(4 * t) * (1 - t)], axis=1)
    w_final = torch.nn.utils.parameters_to_vector(final.parameters()).double()
    checkpoints = []
    for a, b in path:
        m = nn.Linear(6, 4).double()
        torch.nn.utils.vector_to_parameters(w_final + a * basis[:, 0] + b * basis[:, 1], m.parameters())
        checkpoints.append(m)
    final_d = nn.Linear(6, 4).double()
    torch.nn.utils.vector_to_parameters(w_final, final_d.parameters())
    checkpoints.append(final_d)
    traj = trajectory_directions(checkpoints, n=2)
    rows = np.stack([torch.nn.utils.parameters_to_vector(m.parameters()).detach().numpy() for m in checkpoints])
    rows = rows - rows[-1]
    ref = PCA(n_components=2).fit(rows)
    np.testing.assert_allclose(traj.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    assert traj.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-9)
    comps = np.stack([d.flatten().numpy() for d in traj.directions])
    np.testing.assert_allclose(comps @ comps.T, np.eye(2), atol=1e-10)
    np.testing.assert_allclose(traj.coordinates @ comps, rows, atol=1e-8)  # the path lies in the plane
    np.testing.assert_allclose(traj.coordinates[-1], 0.0, atol=1e-12)
    assert traj.to_dataframe().shape == (10, 3)
    with pytest.raises(UserInputError, match="at least"):
        trajectory_directions(checkpoints[:2], n=2)


def test_direction_rejects_non_tensors_and_nan():
    """A Direction holds tensors only; NaN entries are refused when checked against a model."""
    with pytest.raises(UserInputError, match="tensor"):
        Direction({"weight": [1.0, 2.0]})
    model = nn.Linear(2, 1)
    d = Direction({"weight": torch.tensor([[float("nan"), 0.0]])})
    with pytest.raises(UserInputError, match="NaN"):
        normalize_direction(d, model)


class _Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / 12)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        v = self.w.reshape(-1)
        return (0.5 * v @ self.A @ v).expand(len(x))


def test_eigen_directions_are_scaled_top_eigenvectors():
    """On a quadratic the directions are numpy.linalg.eigh's top eigenvectors (up to sign), scaled to
    ||w|| (all parameters, the frozen one included), with zero entries for the frozen parameter."""
    model = _Quadratic()
    dirs = eigen_directions(model, lambda out, _t: out.mean(), (torch.zeros(2, 1), torch.zeros(2)), n=2,
                            tol=1e-8, max_iter=60)
    lam, vec = np.linalg.eigh(model.A.numpy())
    w_norm = float(torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters())))
    for k, d in enumerate(dirs):
        assert d.meta["eigenvalue"] == pytest.approx(lam[-1 - k], rel=1e-6)
        assert d.norm() == pytest.approx(w_norm, rel=1e-9)
        cos = d["w"].reshape(-1).numpy() @ vec[:, -1 - k] / w_norm
        assert abs(cos) == pytest.approx(1.0, abs=1e-6)
        assert torch.count_nonzero(d["b"]) == 0


def test_non_finite_weights_are_refused_naming_the_tensor():
    """Issue 11: directions normalised against NaN/inf weights would be NaN; every maker refuses
    them up front and names the tensor (random, eigen, interpolation and trajectory directions)."""
    bad = small_cnn()
    with torch.no_grad():
        bad[4].weight[1, 2] = float("inf")
    with pytest.raises(UserInputError, match="4.weight"):
        random_directions(bad, 1)
    with pytest.raises(UserInputError, match="4.weight"):
        eigen_directions(bad, nn.functional.cross_entropy, (torch.randn(2, 3, 6, 6), torch.tensor([0, 1])), n=1)
    with pytest.raises(UserInputError, match="model_b.*4.weight"):
        interpolation_direction(small_cnn(), bad)
    good = [small_cnn() for _ in range(3)]
    with pytest.raises(UserInputError, match="checkpoint 1.*4.weight"):
        trajectory_directions([good[0], bad.state_dict(), good[2]], n=1, model=good[0])


def test_eigen_directions_refuse_a_model_that_cannot_run_on_the_data():
    """One cheap forward pass before the Lanczos iterations: a shape mismatch is one line."""
    with pytest.raises(UserInputError, match="cannot run on this data"):
        eigen_directions(small_cnn(), nn.functional.cross_entropy, (torch.randn(2, 10), torch.tensor([0, 1])), n=1)
