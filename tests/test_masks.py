"""Tests of sharpscope.analysis.masks (mask statistics, alignment with Hessian eigenvectors, mask logs)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sharpscope.analysis.hessian import EigenResult
from sharpscope.analysis.masks import (
    AlignmentResult,
    load_mask_log,
    load_mask_statistics,
    mask_statistics,
    perturbation_alignment,
    save_mask_statistics,
    zsharp_masks,
)
from sharpscope.errors import UserInputError
from sharpscope.optim import ZSharp
from sharpscope.optim.zsharp import MASK_STATS_COLUMNS
from sharpscope.train.metrics import MaskLog

CE = nn.functional.cross_entropy


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.tanh(self.fc1(h)))


def make_net(dtype=torch.float32) -> SmallNet:
    torch.manual_seed(1)
    net = SmallNet().to(dtype)
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def make_data(n: int = 24, batch: int = 8, dtype=torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def reference_mask(g: torch.Tensor, percentile: float) -> torch.Tensor:
    """REFERENCE.md in plain torch: z with the unbiased std + 1e-12, torch.quantile, strict >."""
    z = (g - g.mean()) / (g.std() + 1e-12)
    return z.abs() > torch.quantile(z.abs().reshape(-1), percentile)


def zsharp_step(model: nn.Module, batch, **kwargs):
    """Run ZSharp.first_step on the model (eval mode) and return its mask_stats and the ascent e."""
    model.eval()
    model.zero_grad()
    CE(model(batch[0]), batch[1]).backward()
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.first_step()
    e = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    stats = opt.mask_stats
    opt.restore()
    model.zero_grad(set_to_none=True)
    return stats, e


@pytest.mark.parametrize("threshold_scope", ["tensor", "global"])
def test_mask_statistics_equals_zsharp_first_step(threshold_scope):
    """Same batch, same settings: per_batch rows equal ZSharp.first_step's mask_stats column for column,
    under both perturbation readings; the masks equal the support of the optimizer's ascent and the
    plain torch.quantile reference of REFERENCE.md (float64 model, so w + e - w is e exactly enough)."""
    model = make_net(torch.float64)
    batch = make_data(8, 8, torch.float64)[0]
    kw = {"rho": 0.07, "percentile": 0.9, "threshold_scope": threshold_scope}
    table = mask_statistics(model, CE, batch, per_batch=True, progress=False, **kw)
    stats_t, e = zsharp_step(model, batch, perturb_norm="tensor", **kw)
    pd.testing.assert_frame_equal(table[list(MASK_STATS_COLUMNS)], stats_t)
    stats_g, _ = zsharp_step(model, batch, perturb_norm="global", **kw)
    np.testing.assert_array_equal(table["perturbation_norm_global"].to_numpy(), stats_g["perturbation_norm"])
    masks = zsharp_masks(model, CE, batch, 0.9, threshold_scope=threshold_scope)
    assert list(masks) == list(stats_t["layer"])
    for name, mask in masks.items():
        assert torch.equal(mask, e[name] != 0), name
        assert int(mask.sum()) == int(stats_t.set_index("layer").loc[name, "kept"])
    if threshold_scope == "tensor":
        model.zero_grad()
        CE(model(batch[0]), batch[1]).backward()
        for name, p in model.named_parameters():
            if p.ndim > 1:
                assert torch.equal(masks[name], reference_mask(p.grad, 0.9)), name


def test_energy_shares_and_stability_against_hand_written_reference():
    """kept energy, perturbation shares under both readings and the mean Jaccard overlap over the 3
    batches, recomputed in the test from REFERENCE.md formulas (torch.quantile masks, Python sets)."""
    model = make_net(torch.float64).eval()
    data = make_data(24, 8, torch.float64)
    rho, pct = 0.05, 0.8
    summary = mask_statistics(model, CE, data, pct, rho=rho, progress=False).set_index("layer")
    names = [n for n, p in model.named_parameters() if p.ndim > 1]
    per_batch_masks = {n: [] for n in names}
    energy = {n: [] for n in names}
    share_t = {n: [] for n in names}
    share_g = {n: [] for n in names}
    for x, y in data:
        model.zero_grad()
        CE(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        gnorm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        masks = {n: reference_mask(grads[n], pct) for n in names}
        # tensor reading: each filtered tensor has norm rho; others rho * ||g_t|| / ||g||
        e_t = {n: (rho if n in masks else rho * grads[n].norm() / gnorm) for n in grads}
        tot_t = math.sqrt(sum(float(v) ** 2 for v in e_t.values()))
        # global reading: direction g*m (filtered) and g (others), scaled to norm rho as a whole
        d = {n: (grads[n] * masks[n] if n in masks else grads[n]) for n in grads}
        d_norm = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
        for n in names:
            per_batch_masks[n].append({i for i, v in enumerate(masks[n].reshape(-1).tolist()) if v})
            energy[n].append(float((grads[n] * masks[n]).norm() ** 2 / grads[n].norm() ** 2))
            share_t[n].append(float(e_t[n]) ** 2 / tot_t**2)
            share_g[n].append(float((d[n] ** 2).sum()) / d_norm**2)
    model.zero_grad(set_to_none=True)
    for n in names:
        row = summary.loc[n]
        assert row["energy_kept"] == pytest.approx(np.mean(energy[n]), rel=1e-9)
        assert row["perturbation_share_tensor"] == pytest.approx(np.mean(share_t[n]), rel=1e-9)
        assert row["perturbation_share_global"] == pytest.approx(np.mean(share_g[n]), rel=1e-6)
        sets = per_batch_masks[n]
        jac = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:]]
        assert row["mask_jaccard"] == pytest.approx(np.mean(jac), rel=1e-12)
        assert row["fallback_rate"] == 0.0
    # per-tensor normalisation: the total norm is about rho * sqrt(K) (K = 3 filtered tensors here)
    assert summary.attrs["total_perturbation_norm_tensor"] > rho * math.sqrt(3)
    assert summary.attrs["total_perturbation_norm_global"] == pytest.approx(rho, rel=1e-9)


def test_fallback_rate_counts_empty_masks():
    """A weight whose gradient is constant keeps nothing: fallback in every batch, kept 0; the other
    weight is filtered normally (checked against ZSharp's own fallback semantics)."""

    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.const = nn.Parameter(torch.zeros(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.const.sum()

    data = [(torch.randn(6, 5), torch.randn(6, 3)) for _ in range(2)]
    df = mask_statistics(WithConstant(), nn.functional.mse_loss, data, progress=False).set_index("layer")
    assert df.loc["const", "fallback_rate"] == 1.0 and df.loc["const", "kept"] == 0
    assert df.loc["fc.weight", "fallback_rate"] == 0.0 and df.loc["fc.weight", "kept"] >= 1


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def _same(a, b) -> bool:
    return (all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[1], b[1]))
            and a[2] == b[2] and a[3] == b[3])


def test_model_unchanged_and_deterministic():
    """mask_statistics and perturbation_alignment leave parameters, buffers, .grad, requires_grad and
    train flags bit for bit as before (snapshot comparison) and give identical results when repeated."""
    model = make_net().train()
    data = make_data(16, 8)
    CE(model(data[0][0]), data[0][1]).backward()
    model.fc1.bias.requires_grad_(False)
    before = _snapshot(model)
    a = mask_statistics(model, CE, data, progress=False)
    b = mask_statistics(model, CE, data, progress=False)
    pd.testing.assert_frame_equal(a.to_dataframe(), b.to_dataframe())
    r1 = perturbation_alignment(model, CE, data, k=2, progress=False)
    r2 = perturbation_alignment(model, CE, data, k=2, progress=False)
    pd.testing.assert_frame_equal(r1.to_dataframe(), r2.to_dataframe())
    assert _same(before, _snapshot(model))


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w + b^T w over a (5, 8) weight, with b = c v1 along the top eigenvector of A."""

    def __init__(self, eigenvalues: np.ndarray, c: float = 2.0) -> None:
        super().__init__()
        n = 40
        rng = np.random.default_rng(0)
        v1 = np.zeros(n)
        v1[[3, 17]] = [0.6, -0.8]  # two entries: exactly the 5 % that ZSharp keeps at percentile 0.95
        rest = np.linalg.qr(np.column_stack([v1, rng.normal(size=(n, n - 1))]))[0][:, 1:]
        q = np.column_stack([v1, rest])
        self.register_buffer("A", torch.as_tensor(q @ np.diag(eigenvalues) @ q.T))
        self.register_buffer("b", torch.as_tensor(c * v1))
        self.v = q
        self.weight = nn.Parameter(torch.zeros(5, 8, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(-1)
        return (0.5 * w @ self.A @ w + self.b @ w).expand(len(x))


def test_alignment_on_a_quadratic_with_gradient_along_a_known_eigenvector():
    """Gradient b = c v1 at w = 0: every method's ascent is rho v1, so |cos(e, v1)| = 1, cos with v2 = 0,
    directional curvature = lambda_1 and L(w + e) - L(w) = lambda_1 rho^2 / 2 + c rho (closed form)."""
    lam = np.concatenate([[7.0, 3.0], np.linspace(2.0, -1.0, 38)])
    model = Quadratic(lam)
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))
    rho = 0.1
    res = perturbation_alignment(model, lambda out, y: out.mean(), data, k=2, rho=rho, tol=1e-10, max_iter=40,
                                 progress=False)
    np.testing.assert_allclose(res.eigenvalues, [7.0, 3.0], rtol=1e-9)
    df = res.to_dataframe().set_index("method")
    for m in ("sam", "zsharp", "zsharp_global", "asam"):
        assert df.loc[m, "cos_v1"] == pytest.approx(1.0, abs=1e-9), m
        assert df.loc[m, "cos_v2"] == pytest.approx(0.0, abs=1e-9), m
        assert df.loc[m, "cos_subspace"] == pytest.approx(1.0, abs=1e-9), m
        assert df.loc[m, "directional_curvature"] == pytest.approx(7.0, rel=1e-9), m
        assert df.loc[m, "loss_increase"] == pytest.approx(7.0 * rho**2 / 2 + 2.0 * rho, rel=1e-9), m
    assert df.loc["random", "cos_v1"] < 0.9
    assert (df["norm"] == rho).all()


def test_alignment_against_the_exact_hessian():
    """Tiny float64 net: cosines with the top-2 eigenvectors of the exact Hessian (torch.func.hessian +
    numpy.linalg.eigh), the directional curvature e^T H e / |e|^2 and the loss increase, all recomputed in
    the test from the ascent directions that ZSharp/SAM give."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    data = [(x[:10], y[:10]), (x[10:], y[10:])]  # unequal batches: weighted as the full data
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def flat_loss(w: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (c.reshape(s) for c, s in zip(torch.split(w, sizes), shapes))))
        return CE(torch.func.functional_call(model, parts, (x,)), y)

    w0 = torch.cat([p.reshape(-1) for p in params.values()])
    hess = torch.func.hessian(flat_loss)(w0).numpy()
    evals, evecs = np.linalg.eigh(hess)
    top = evecs[:, ::-1][:, :2]
    g = torch.func.grad(flat_loss)(w0)
    rho = 0.05
    lanczos = perturbation_alignment(model, CE, data, k=2, rho=rho, tol=1e-10, max_iter=60, progress=False)
    np.testing.assert_allclose(lanczos.eigenvalues, evals[::-1][:2], rtol=1e-8)
    # The exact eigenvectors, so that the comparison does not depend on the eigen-solver's accuracy.
    exact = EigenResult(eigenvalues=evals[::-1][:2].copy(), eigenvectors=top.copy(), residuals=np.zeros(2),
                        error_bounds=np.zeros(2), n_hvp=0, converged=True, param_names=names,
                        shapes=[tuple(s) for s in shapes])
    res = perturbation_alignment(model, CE, data, k=2, rho=rho, eigen=exact, progress=False)
    pd.testing.assert_frame_equal(res.to_dataframe(), lanczos.to_dataframe(), rtol=1e-5)
    df = res.to_dataframe().set_index("method")
    sam = (g / g.norm()).numpy()
    assert df.loc["sam", "cos_v1"] == pytest.approx(abs(sam @ top[:, 0]), rel=1e-7)
    assert df.loc["sam", "cos_subspace"] == pytest.approx(np.linalg.norm(top.T @ sam), rel=1e-7)
    # ZSharp, official reading, from REFERENCE.md: filtered tensors g*m to norm rho, others rho g/|g|
    parts = []
    for c, s in zip(torch.split(g, sizes), shapes):
        if len(s) > 1:
            gf = c * reference_mask(c.reshape(s), 0.95).reshape(-1)
            parts.append(rho * gf / (gf.norm() + 1e-12))
        else:
            parts.append(rho * c / (g.norm() + 1e-12))
    e = torch.cat(parts).numpy()
    u = e / np.linalg.norm(e)
    assert df.loc["zsharp", "cos_v1"] == pytest.approx(abs(u @ top[:, 0]), rel=1e-7)
    assert df.loc["zsharp", "directional_curvature"] == pytest.approx(u @ hess @ u, rel=1e-7)
    loss0 = float(flat_loss(w0))
    assert df.loc["zsharp", "loss_increase"] == pytest.approx(
        float(flat_loss(w0 + torch.as_tensor(rho * u))) - loss0, rel=1e-7)
    layers = res.layer_dataframe()
    fc2 = layers[(layers["method"] == "sam") & (layers["layer"] == "2.weight") & (layers["eigenvector"] == 1)]
    start = sizes[0] + sizes[1]
    block = slice(start, start + sizes[2])
    expected = abs(sam[block] @ top[block, 0]) / (np.linalg.norm(sam[block]) * np.linalg.norm(top[block, 0]))
    assert fc2["cosine"].iloc[0] == pytest.approx(expected, rel=1e-7)


def test_alignment_save_load(tmp_path):
    """An alignment result reads back with the same tables and settings."""
    model = make_net()
    res = perturbation_alignment(model, CE, make_data(8, 8), k=1, methods=("sam", "zsharp"), progress=False)
    back = AlignmentResult.load(res.save(tmp_path / "align.nc"))
    pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe())
    pd.testing.assert_frame_equal(back.layer_dataframe(), res.layer_dataframe())
    assert back.settings == res.settings


def test_mask_statistics_save_load(tmp_path):
    """Summary and per-batch tables read back identical, attrs (total norms, settings) included."""
    model, data = make_net(), make_data(16, 8)
    for per_batch in (False, True):
        table = mask_statistics(model, CE, data, per_batch=per_batch, progress=False)
        back = load_mask_statistics(save_mask_statistics(table, tmp_path / f"m{per_batch}.nc"))
        # netCDF3 stores int64 as int32 and text as characters: values must match, dtypes may not
        pd.testing.assert_frame_equal(back.to_dataframe(), table.to_dataframe(), check_dtype=False)
        assert back.attrs == table.attrs
        if per_batch:
            assert back["fallback"].dtype == bool


def _write_log(path, model, steps=(0, 2, 4)):
    """A mask log written by the training code's own MaskLog from real ZSharp steps."""
    log = MaskLog(path)
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.05)
    x, y = make_data(8, 8)[0]
    for step in range(max(steps) + 1):
        CE(model(x), y).backward()
        opt.first_step(zero_grad=True)
        CE(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if step in steps:
            log.add(step, 0, opt.mask_stats)
    log.write()


def test_load_mask_log_round_trip(tmp_path):
    """A log written by sharpscope.train's MaskLog loads as a tidy table (from the file or the run
    folder) with the values ZSharp logged."""
    model = make_net()
    _write_log(tmp_path / "masks.csv", model)
    df = load_mask_log(tmp_path, model=model)
    assert list(df.columns) == ["step", "epoch", *MASK_STATS_COLUMNS]
    assert sorted(set(df["step"])) == [0, 2, 4]
    assert df["fallback"].dtype == bool
    assert list(df[df["step"] == 0]["layer"]) == ["conv.weight", "fc1.weight", "fc2.weight"]
    raw = pd.read_csv(tmp_path / "masks.csv")
    np.testing.assert_allclose(df["kept_fraction"].to_numpy(), raw["kept_fraction"].to_numpy())


def test_load_mask_log_bad_files(tmp_path):
    """Missing file, a metrics file, a CSV without the mask columns and a log from another model:
    one clear UserInputError each."""
    with pytest.raises(UserInputError, match="mask log not found"):
        load_mask_log(tmp_path / "nope.csv")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 1.0}\n')
    with pytest.raises(UserInputError, match="not a ZSharp mask log"):
        load_mask_log(tmp_path / "metrics.jsonl")
    pd.DataFrame({"step": [0], "layer": ["a"], "loss": [1.0]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(UserInputError, match="missing column"):
        load_mask_log(tmp_path / "other.csv")
    _write_log(tmp_path / "masks.csv", make_net(), steps=(0,))
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(UserInputError, match="another run"):
        load_mask_log(tmp_path / "masks.csv", model=other)


@pytest.mark.parametrize("percentile", [0.0, 1.0, 2.0, -0.5])
def test_bad_input(percentile):
    """percentile outside (0, 1), rho <= 0, unknown methods, and a model with no tensor of ndim > 1."""
    model, data = make_net(), make_data(8, 8)
    with pytest.raises(UserInputError, match=r"open interval \(0, 1\)"):
        mask_statistics(model, CE, data, percentile, progress=False)
    with pytest.raises(UserInputError, match=r"open interval \(0, 1\)"):
        zsharp_masks(model, CE, data, percentile)
    with pytest.raises(UserInputError, match="rho"):
        mask_statistics(model, CE, data, rho=0.0, progress=False)
    with pytest.raises(UserInputError, match="methods"):
        perturbation_alignment(model, CE, data, methods=("sgd",), progress=False)
    flat = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(UserInputError, match="ndim > 1"):
        mask_statistics(flat, nn.functional.mse_loss, (torch.randn(5, 4), torch.randn(5, 4)), progress=False)


def test_non_finite_weights_are_refused_up_front_naming_the_tensor():
    """Issue 11: every analysis here refuses NaN/inf weights before the gradient pass and names the
    tensor (they used to end in a FloatingPointError traceback)."""
    model, data = make_net(), make_data(8, 8)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    for run in (lambda: mask_statistics(model, CE, data, progress=False),
                lambda: zsharp_masks(model, CE, data),
                lambda: perturbation_alignment(model, CE, data, k=1, progress=False)):
        with pytest.raises(UserInputError, match="fc1.weight") as err:
            run()
        assert "\n" not in str(err.value)


def test_model_that_cannot_run_on_the_data_is_one_line():
    """A conv net given flat vectors: one UserInputError line from the cheap check, not a RuntimeError."""
    model, flat = make_net(), [(torch.randn(4, 12), torch.randint(0, 4, (4,)))]
    for run in (lambda: mask_statistics(model, CE, flat, progress=False),
                lambda: zsharp_masks(model, CE, flat),
                lambda: perturbation_alignment(model, CE, flat, k=1, progress=False)):
        with pytest.raises(UserInputError, match="cannot run on this data"):
            run()


@pytest.mark.parametrize("damage", ["hole", "infinite", "fraction"])
def test_corrupted_mask_log_is_one_line(tmp_path, damage):
    """Issue 11: a masks.csv with an emptied field, an infinite or a fractional count (e.g. a
    damaged write) used to load silently with NaN/inf or fail with a ValueError when checked
    against the model; now one UserInputError line names the damage."""
    model = make_net()
    _write_log(tmp_path / "masks.csv", model, steps=(0, 2))
    lines = (tmp_path / "masks.csv").read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[-1].split(",")
    fields[header.index("numel")] = {"hole": "", "infinite": "inf", "fraction": "2.5"}[damage]
    lines[-1] = ",".join(fields)
    (tmp_path / "masks.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match="damaged") as err:
        load_mask_log(tmp_path, model=model)
    assert "\n" not in str(err.value)


def test_truncated_mask_log_is_one_line(tmp_path):
    """A log cut in the middle of its last line (a killed writer) is refused in one line."""
    _write_log(tmp_path / "masks.csv", make_net(), steps=(0,))
    text = (tmp_path / "masks.csv").read_text()
    (tmp_path / "masks.csv").write_text(text[: len(text) - 25])
    with pytest.raises(UserInputError, match="damaged|not a ZSharp mask log"):
        load_mask_log(tmp_path / "masks.csv")
