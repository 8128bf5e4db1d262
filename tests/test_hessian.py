"""Eigenvalues, trace, density and per-layer curvature against the exact Hessian of tiny float64 models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.hessian import (
    DensityResult,
    EigenResult,
    TraceResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    layer_curvature,
    load_layer_curvature,
    save_layer_curvature,
)
from tests._curvature_models import cnn_data, exact_hessian, mlp_data, tiny_cnn, tiny_mlp, trained_mlp

CE = nn.CrossEntropyLoss()
QUIET = {"progress": False}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request):
    model, (x, y) = (tiny_mlp(), mlp_data()) if request.param == "mlp" else (tiny_cnn(), cnn_data())
    H = exact_hessian(model, CE, x, y)
    return model, (x, y), H, np.linalg.eigvalsh(H)


def test_top3_and_most_negative_match_exact_eigvalsh(case) -> None:
    """Top-3 (LA) and 2 most negative (SA) eigenvalues vs numpy.linalg.eigvalsh of torch.func.hessian, 1e-8
    relative; reported residuals equal the explicitly computed ||Hv - lambda v|| / |lambda|."""
    model, data, H, ev = case
    top = hessian_eigenvalues(model, CE, data, k=3, tol=1e-10, max_iter=300, **QUIET)
    assert top.converged
    np.testing.assert_allclose(top.eigenvalues, ev[::-1][:3], rtol=1e-8)
    V = top.eigenvectors
    explicit = np.linalg.norm(H @ V - V * top.eigenvalues, axis=0) / np.abs(top.eigenvalues)
    np.testing.assert_allclose(top.residuals, explicit, rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-10)
    low = hessian_eigenvalues(model, CE, data, k=2, which="SA", tol=1e-10, max_iter=300, **QUIET)
    assert low.converged
    np.testing.assert_allclose(low.eigenvalues, ev[:2], rtol=1e-8)


def test_default_tolerance_is_met_against_the_truth(case) -> None:
    """With the default tol=1e-3 the top eigenvalue is within 1e-3 relative of eigvalsh's, and the
    reported error bound covers the actual error."""
    model, data, _, ev = case
    for seed in range(3):
        res = hessian_eigenvalues(model, CE, data, k=1, seed=seed, **QUIET)
        err = abs(res.eigenvalues[0] - ev[-1])
        assert err <= 1e-3 * abs(ev[-1])
        assert err <= res.error_bounds[0] * (1 + 1e-6) + 1e-14


def test_restarts_converge_with_a_small_basis() -> None:
    """A basis of 7 vectors forces thick restarts; top-3 still matches eigvalsh to 1e-8."""
    model, data = tiny_mlp(), mlp_data()
    ev = np.linalg.eigvalsh(exact_hessian(model, CE, *data))
    res = hessian_eigenvalues(model, CE, data, k=3, tol=1e-10, max_iter=500, max_basis=7, **QUIET)
    assert res.converged and res.n_hvp > 7
    np.testing.assert_allclose(res.eigenvalues, ev[::-1][:3], rtol=1e-8)


def _trace_errors(model, data, H, seeds=range(10), budget=30):
    truth = np.trace(H)
    out = {}
    for method in ("hutch++", "hutchinson", "krylov"):
        errs, z = [], []
        for seed in seeds:
            tr = hessian_trace(model, CE, data, n_samples=budget, method=method, seed=seed, **QUIET)
            assert tr.n_hvp == budget and tr.method == method
            errs.append(abs(tr.estimate - truth))
            z.append(abs(tr.estimate - truth) / tr.stderr)
        out[method] = (np.mean(errs), np.mean(np.asarray(z) <= 3))
    return out


def test_trace_standard_error_covers_truth(case) -> None:
    """Against trace(H) of torch.func.hessian: for every method at least 90 % of 20 seeds lie within
    3 standard errors (a random-init model: indefinite, flat spectrum)."""
    model, data, H, _ = case
    for method, (_, covered) in _trace_errors(model, data, H, seeds=range(20)).items():
        assert covered >= 0.9, method


def test_hutchpp_beats_hutchinson_at_equal_budget() -> None:
    """Near a minimum (a trained tiny MLP, exact trace from torch.func.hessian) the mean absolute error of
    Hutch++ over 10 seeds is at most half of Hutchinson's at the same 30-HVP budget (Krylov too), and
    the standard errors still cover the truth."""
    model, data = trained_mlp()
    H = exact_hessian(model, CE, *data)
    res = _trace_errors(model, data, H)
    assert res["hutch++"][0] <= 0.5 * res["hutchinson"][0]
    assert res["krylov"][0] <= 0.5 * res["hutchinson"][0]
    assert all(covered >= 0.9 for _, covered in res.values())


def test_slq_moments_match_normalised_traces_of_powers(case) -> None:
    """Mean over probes of sum_i w_i theta_i^j vs trace(H^j)/n for j = 0..3, within 4 standard errors
    of the probe average (each probe's moment is exact for j < 2 n_iter)."""
    model, data, H, ev = case
    d = hessian_density(model, CE, data, n_iter=8, n_runs=60, seed=0, **QUIET)
    assert d.n_hvp == 8 * 60
    per_run = np.array([[np.sum(w * n**j) for j in range(4)] for n, w in zip(d.nodes, d.weights)])
    truth = np.array([np.trace(np.linalg.matrix_power(H, j)) / len(H) for j in range(4)])
    se = per_run.std(axis=0, ddof=1) / np.sqrt(len(per_run))
    np.testing.assert_allclose(per_run[:, 0], 1.0, atol=1e-12)
    assert np.all(np.abs(per_run.mean(axis=0) - truth) <= 4 * se + 1e-12)
    np.testing.assert_allclose(d.moments(3), per_run.mean(axis=0))
    assert abs(np.trapezoid(d.density, d.grid) - 1) < 1e-3
    top, bound = d.top_eigenvalues(1)
    assert abs(top[0] - ev[-1]) <= bound[0] + 1e-12


def test_layer_curvature_matches_exact_blocks(case) -> None:
    """Per tensor: top eigenvalue and trace of the exact diagonal block of torch.func.hessian."""
    model, data, H, _ = case
    df = layer_curvature(model, CE, data, tol=1e-10, max_iter=300, n_trace_samples=200, **QUIET)
    names = [n for n, _ in model.named_parameters()]
    assert list(df["layer"]) == names
    start = 0
    for row, (_, p) in zip(df.itertuples(), model.named_parameters()):
        block = H[start:start + p.numel(), start:start + p.numel()]
        start += p.numel()
        assert row.numel == p.numel()
        np.testing.assert_allclose(row.trace, np.trace(block), rtol=1e-10, atol=1e-12)
        top = np.linalg.eigvalsh(block)[-1]
        assert abs(row.top_eigenvalue - top) <= 1e-8 * abs(top) + 1e-12


def test_layer_curvature_hutchpp_for_large_tensors_and_roundtrip(tmp_path) -> None:
    """Tensors above n_trace_samples get a Hutch++ trace within 3 stderr of the exact block trace; the
    table saves and loads unchanged."""
    model, data = tiny_mlp(), mlp_data()
    H = exact_hessian(model, CE, *data, names=["0.weight"])
    df = layer_curvature(model, CE, data, n_trace_samples=12, **QUIET)
    row = df.set_index("layer").loc["0.weight"]
    assert row["trace_method"] == "hutch++"
    assert abs(row["trace"] - np.trace(H)) <= 3 * row["trace_stderr"]
    back = load_layer_curvature(save_layer_curvature(df, tmp_path / "layers.nc"))
    assert back.attrs["settings"]["model_fingerprint"] == df.attrs["settings"]["model_fingerprint"]
    import pandas as pd
    pd.testing.assert_frame_equal(back.to_dataframe(), df.to_dataframe(), check_dtype=False)


def test_results_roundtrip(tmp_path) -> None:
    """save/load of every result class reproduces the numbers and the settings."""
    model, data = tiny_mlp(), mlp_data()
    e = hessian_eigenvalues(model, CE, data, k=2, **QUIET)
    e2 = EigenResult.load(e.save(tmp_path / "e.nc"))
    np.testing.assert_array_equal(e2.eigenvalues, e.eigenvalues)
    np.testing.assert_array_equal(e2.eigenvectors, e.eigenvectors)
    assert e2.settings == e.settings and e2.n_hvp == e.n_hvp and e2.converged == e.converged
    assert torch.equal(e2.eigenvector_tensors(1)["2.bias"], e.eigenvector_tensors(1)["2.bias"])
    assert list(e.to_dataframe().columns) == ["rank", "eigenvalue", "residual", "error_bound", "converged"]
    t = hessian_trace(model, CE, data, n_samples=9, **QUIET)
    t2 = TraceResult.load(t.save(tmp_path / "t.nc"))
    assert (t2.estimate, t2.stderr, t2.n_hvp, t2.method) == (t.estimate, t.stderr, t.n_hvp, t.method)
    d = hessian_density(model, CE, data, n_iter=5, n_runs=2, **QUIET)
    d2 = DensityResult.load(d.save(tmp_path / "d.nc"))
    for a, b in zip(d.nodes + d.weights, d2.nodes + d2.weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(d2.density, d.density)
    assert d2.settings["seed"] == 0 and d2.n_hvp == 10


def test_same_seed_same_numbers_and_model_untouched() -> None:
    """Reproducible for a seed; the model's state and .grad are bit-for-bit unchanged by every analysis."""
    model, data = tiny_cnn(), cnn_data()
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    a = hessian_trace(model, CE, data, n_samples=12, seed=3, **QUIET)
    b = hessian_trace(model, CE, data, n_samples=12, seed=3, **QUIET)
    assert a.estimate == b.estimate
    hessian_eigenvalues(model, CE, data, k=2, **QUIET)
    hessian_density(model, CE, data, n_iter=4, **QUIET)
    layer_curvature(model, CE, data, max_iter=20, **QUIET)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_warns_when_largest_magnitude_eigenvalue_is_negative() -> None:
    """A concave loss (H negative definite): the top eigenvalue is reported with a warning."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x = torch.randn(30, 4, dtype=torch.float64)

    def concave(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return -(out**2).mean()

    with pytest.warns(RuntimeWarning, match="largest-magnitude Hessian eigenvalue is negative"):
        hessian_eigenvalues(model, concave, (x, torch.zeros(30)), k=1, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_eigenvalues(tiny_mlp(), CE, mlp_data(), k=1, **QUIET)


def test_bad_input() -> None:
    """k too large, bad k/tol/which/method/budget, empty data, non-scalar and non-finite loss: clear errors;
    running out of max_iter warns and says converged=False."""
    model, (x, y) = tiny_mlp(), mlp_data()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="larger than the number of parameters"):
        hessian_eigenvalues(model, CE, (x, y), k=dim + 1, **QUIET)
    for kwargs, msg in [({"k": 0}, "k must be"), ({"tol": 0}, "tol"), ({"which": "LM"}, "which"),
                        ({"backend": "scipy"}, "backend")]:
        with pytest.raises(ValueError, match=msg):
            hessian_eigenvalues(model, CE, (x, y), **kwargs, **QUIET)
    with pytest.raises(ValueError, match="n_samples"):
        hessian_trace(model, CE, (x, y), n_samples=3, **QUIET)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, CE, (x, y), method="exact", **QUIET)
    with pytest.raises(ValueError, match="empty"):
        hessian_density(model, CE, [], **QUIET)
    with pytest.raises(ValueError, match="sigma"):
        hessian_density(model, CE, (x, y), n_iter=3, sigma=-1.0, **QUIET)
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace(model, nn.CrossEntropyLoss(reduction="none"), (x, y), **QUIET)
    bad = x.clone()
    bad[3] = float("inf")
    with pytest.raises(FloatingPointError, match="not finite"):
        hessian_eigenvalues(model, CE, (bad, y), **QUIET)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = hessian_eigenvalues(model, CE, (x, y), k=3, tol=1e-12, max_iter=4, **QUIET)
    assert not res.converged and res.n_hvp == 4


def test_progress_bars_do_not_change_results(capsys, monkeypatch) -> None:
    """With progress bars on, the numbers are those of a silent run (same seed) and a bar is drawn."""
    monkeypatch.setenv("SHARPSCOPE_PROGRESS", "always")  # captured stderr is not a terminal
    model, data = tiny_mlp(), mlp_data()
    loud = hessian_trace(model, CE, data, n_samples=9, method="krylov", progress=True)
    quiet = hessian_trace(model, CE, data, n_samples=9, method="krylov", **QUIET)
    assert loud.estimate == quiet.estimate
    assert "trace" in capsys.readouterr().err
    e = hessian_eigenvalues(model, CE, data, k=2, progress=True)
    assert e.eigenvalues.tolist() == hessian_eigenvalues(model, CE, data, k=2, **QUIET).eigenvalues.tolist()
    hessian_density(model, CE, data, n_iter=3, n_runs=2, progress=True)
    layer_curvature(model, CE, data, max_iter=10, progress=True)
    with pytest.raises(ValueError, match="pyhessian"):
        hessian_eigenvalues(model, CE, data, backend="pyhessian", dtype=torch.float64, **QUIET)


def test_a_tensor_dataset_is_batched_not_read_example_by_example() -> None:
    """A TensorDataset (single examples when iterated) gives the same eigenvalue as the batch itself
    (checked against the one-batch call), in batches of DATASET_BATCH_SIZE, not one example each."""
    from torch.utils.data import TensorDataset

    from sharpscope.analysis.batching import DATASET_BATCH_SIZE, as_batches

    model, (x, y) = tiny_mlp(), mlp_data(n=300)
    batches = as_batches(TensorDataset(x, y))
    assert [len(b[0]) for b in batches] == [DATASET_BATCH_SIZE, 300 - DATASET_BATCH_SIZE]
    a = hessian_eigenvalues(model, CE, TensorDataset(x, y), k=1, tol=1e-8, progress=False).eigenvalues
    b = hessian_eigenvalues(model, CE, (x, y), k=1, tol=1e-8, progress=False).eigenvalues
    np.testing.assert_allclose(a, b, rtol=1e-8)


def _looped_matmat(self, V):
    """The column-by-column reference: ``H V`` as stacked single products (what the estimators did before;
    columns copied contiguous, and returned as the transpose of ``(k, dim)`` rows, as matmat does: strided
    vectors change the rounding of a product or a dot product)."""
    V = self._check_block(V)
    return torch.stack([self.matvec(V[:, j].contiguous()) for j in range(V.shape[1])]).T


@pytest.mark.parametrize("hvp", ["autograd", "func", "auto"])
def test_block_products_in_trace_equal_the_column_loop(hvp, monkeypatch) -> None:
    """Hutch++, Hutchinson and Krylov traces with the block products (HessianOperator.matmat in blocks of
    BLOCK columns) equal, to 1e-12 relative, the same estimators with every block replaced by a loop of
    single matvec products (the independent reference); n_hvp counts every column. Tiny MLP, three
    unequal batches (so the weighting over batches and the per-block gradient graphs are exercised)."""
    from sharpscope.analysis import hessian as hessian_module
    from sharpscope.analysis.curvature import HessianOperator

    model, (x, y) = tiny_mlp(), mlp_data(n=52)
    batches = [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])]
    widths: list[int] = []
    block = HessianOperator.matmat

    def spied(self, V):
        widths.append(V.shape[1])
        return block(self, V)

    monkeypatch.setattr(HessianOperator, "matmat", spied)
    kw = {"n_samples": 31, "seed": 4, "hvp": hvp, **QUIET}
    blocked = {m: hessian_trace(model, CE, batches, method=m, **kw) for m in ("hutch++", "hutchinson", "krylov")}
    assert widths == [8, 2, 8, 2, 8, 3] + [8, 8, 8, 7] + [8, 8] and hessian_module.BLOCK == 8
    monkeypatch.setattr(HessianOperator, "matmat", _looped_matmat)
    for method, got in blocked.items():
        want = hessian_trace(model, CE, batches, method=method, **kw)
        assert got.n_hvp == want.n_hvp == 31
        got_all = np.r_[got.samples, got.estimate, got.stderr, got.exact_part]
        want_all = np.r_[want.samples, want.estimate, want.stderr, want.exact_part]
        if hvp == "auto":  # a block may take double backward where "auto" timed forward-over-reverse faster
            np.testing.assert_allclose(got_all, want_all, rtol=0, atol=1e-12 * np.abs(want_all).max())
        else:  # the same products in the same order: bit for bit
            np.testing.assert_array_equal(got_all, want_all)
