"""SharpnessTracker: each measure against an independent computation, state untouched, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.analysis.lanczos import thick_restart_lanczos
from sharpscope.errors import UserInputError
from sharpscope.optim import ZSharp
from sharpscope.track import (
    LambdaMax,
    Preconditioned,
    SharpnessTracker,
    Trace,
    UpdateCurvature,
    stability_threshold,
)
from sharpscope.track.measure import first_samples
from tests._curvature_models import exact_hessian, mlp_data, tiny_cnn, tiny_mlp


def _train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, tracker=None, start: int = 0):
    """Plain training loop; the batch of step s is a fixed function of s (so runs can be compared)."""
    x, y = data
    for step in range(start, start + steps):
        i = torch.arange(step * 7, step * 7 + 16) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        if tracker is not None:
            tracker.step(step, optimizer=opt)


def test_warm_start_agrees_with_cold_lanczos_within_residual():
    """Each warm-started lambda_max lies within its residual (plus the reference's) of a cold, tight Lanczos
    and of numpy's top eigenvalue of the exact Hessian; after the first event it uses fewer products than a
    cold start to the same tolerance."""
    model, data = tiny_mlp(), mlp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    tracker = SharpnessTracker(model, F.cross_entropy, data, every=3, measures=[LambdaMax(tol=1e-3)])
    warm, cold = [], []
    for step in range(12):
        _train(model, opt, data, 1, start=step)
        rows = tracker.step(step, optimizer=opt)
        if not rows:
            continue
        row = rows[0].values
        H = exact_hessian(model, F.cross_entropy, *data)
        top = np.linalg.eigvalsh(H)[-1]
        ref = thick_restart_lanczos(torch.as_tensor(H).__matmul__, torch.randn(len(H), dtype=torch.float64),
                                    tol=1e-3, max_matvec=200)
        residual = row["residual"] * abs(row["value"])
        assert abs(row["value"] - ref.values[0]) <= residual + ref.residuals[0] + 1e-12
        assert abs(row["value"] - top) <= residual + 1e-12
        assert row["threshold"] == pytest.approx((2 + 2 * 0.9) / 0.2)  # heavy-ball SGD
        warm.append(row["n_hvp"])
        cold.append(ref.n_matvec)
    assert len(warm) == 4 and np.mean(warm[1:]) < np.mean(cold[1:])


def test_one_product_warm_events_meet_the_tolerance_against_the_exact_eigenvalue():
    """When the weights move little between events the warm vector's Rayleigh quotient is accepted after ONE
    product (r^2 / gap bound); every reported value is within tol of numpy's top eigenvalue of the exact
    Hessian, and within its own error bound; dict batches with a loss_fn(model, batch) give the same values."""
    model, data = tiny_mlp(), mlp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    tol = 1e-2
    tracker = SharpnessTracker(model, F.cross_entropy, data, every=1, measures=[LambdaMax(tol=tol)])
    as_dicts = SharpnessTracker(model, lambda model, batch: F.cross_entropy(model(batch["x"]), batch["labels"]),
                                {"x": data[0], "labels": data[1]}, every=1, measures=[LambdaMax(tol=tol)])
    counts = []
    for step in range(6):
        _train(model, opt, data, 1, start=step)
        row = tracker.step(step)[0].values
        top = np.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, *data))[-1]
        assert abs(row["value"] - top) <= tol * abs(top)
        assert abs(row["value"] - top) <= row["error_bound"] + 1e-9 * abs(top)
        assert as_dicts.step(step)[0].values["value"] == pytest.approx(row["value"], rel=1e-6)
        counts.append(row["n_hvp"])
    assert counts[0] > 2 and min(counts[1:]) == 1


def _adam_preconditioner(opt: torch.optim.Adam, params: list[torch.Tensor]) -> np.ndarray:
    """diag(sqrt(v / (1 - beta2^t))) + eps, flattened, from Adam's state (written out here independently)."""
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    out = []
    for p in params:
        st = opt.state[p]
        out.append(np.sqrt(st["exp_avg_sq"].numpy().reshape(-1) / (1 - beta2 ** float(st["step"]))) + eps)
    return np.concatenate(out)


@pytest.mark.parametrize("wrapped", [False, True])
def test_preconditioned_matches_explicit_eigenvalue_of_P_inverse_H(wrapped):
    """lambda_max(P^-1 H) against numpy's eigenvalues of the explicit non-symmetric matrix P^-1 H (exact
    Hessian of a float64 model, P from Adam's state); threshold 38/lr for beta1 = 0.9 (Cohen et al. 2022)."""
    model, data = tiny_mlp(), mlp_data()
    if wrapped:
        opt = ZSharp(model.named_parameters(), torch.optim.Adam, lr=0.01)
        base = opt.base_optimizer
        x, y = data
        for _ in range(5):
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    else:
        opt = base = torch.optim.Adam(model.parameters(), lr=0.01)
        _train(model, opt, data, 5)
    tracker = SharpnessTracker(model, F.cross_entropy, data, every=1, measures=[Preconditioned(tol=1e-9, max_hvp=200)])
    row = tracker.step(5, optimizer=opt)[0].values
    H = exact_hessian(model, F.cross_entropy, *data)
    P = _adam_preconditioner(base, list(model.parameters()))
    expected = np.max(np.linalg.eigvals(H / P[:, None]).real)
    assert row["value"] == pytest.approx(expected, rel=1e-6)
    assert row["threshold"] == pytest.approx(38 / 0.01)
    assert row["ratio"] == pytest.approx(row["value"] / row["threshold"])


def test_preconditioned_for_sgd_is_lambda_max_with_momentum_threshold():
    """SGD has P = I: the value is lambda_max(H) (numpy on the exact Hessian); thresholds (2 + 2 beta)/lr,
    Nesterov 2(1 + beta)/((1 + 2 beta) lr), from the 2x2 recurrence on one eigendirection."""
    model, data = tiny_mlp(), mlp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    _train(model, opt, data, 2)
    tracker = SharpnessTracker(model, F.cross_entropy, data, measures=[Preconditioned(tol=1e-9, max_hvp=200)])
    row = tracker.step(0, optimizer=opt)[0].values
    assert row["value"] == pytest.approx(np.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, *data))[-1],
                                         rel=1e-6)
    assert row["threshold"] == pytest.approx(3.0 / 0.05)
    nesterov = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, nesterov=True)
    assert stability_threshold(nesterov) == pytest.approx(2 * 1.5 / (2.0 * 0.05))


class _Quadratic(nn.Module):
    """Output is the parameter vector itself; with loss 0.5 w^T A w the Hessian is A everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), 3)


class _NoVmapQuadratic(_Quadratic):
    """The same function with a host read in forward, which torch.func.vmap refuses (point-by-point fallback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.w.abs().sum().item() < 1e9
        return super().forward(x)


A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)


def _quadratic_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.einsum("ni,ij,nj->n", out, A, out).mean()


@pytest.mark.parametrize("a, module", [(1.0, _Quadratic), (0.5, _Quadratic), (1.0, _NoVmapQuadratic)])
def test_update_curvature_on_a_quadratic(a, module):
    """(L(w+ad) - 2L(w) + L(w-ad)) / (a^2 |d|^2) equals d^T A d / |d|^2 on a quadratic, for the update d
    computed here from the weights before and after each step (step 2 reuses the previous loss: no buffers);
    batched by vmap, or point by point for a model vmap cannot run."""
    model = module()
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = SharpnessTracker(model, _quadratic_loss, data, measures=[UpdateCurvature(a=a)])
    assert tracker.step(0, optimizer=opt) == []  # no previous weights yet: nothing to report
    for step in (1, 2):
        before = model.w.detach().clone()
        opt.zero_grad()
        _quadratic_loss(model(data[0]), data[1]).backward()
        opt.step()
        d = model.w.detach() - before
        row = tracker.step(step, optimizer=opt)[0].values
        assert row["value"] == pytest.approx(float(d @ A @ d / (d @ d)), rel=1e-9)
        assert row["update_norm"] == pytest.approx(float(d.norm()))


def test_trace_is_exact_when_the_sketch_spans_the_space():
    """Hutch++ whose sketch has as many columns as parameters returns the exact trace (numpy on the exact
    Hessian) with zero standard error."""
    model, data = tiny_mlp(), mlp_data()
    dim = sum(p.numel() for p in model.parameters())
    tracker = SharpnessTracker(model, F.cross_entropy, data, measures=[Trace(n_hvp=3 * dim)])
    row = tracker.step(0)[0].values
    assert row["value"] == pytest.approx(np.trace(exact_hessian(model, F.cross_entropy, *data)), rel=1e-9)
    assert row["stderr"] == 0.0


def _zsharp_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def test_masks_read_from_optimizer_without_a_forward_pass():
    """Per-layer kept fraction and threshold equal ZSharp.mask_stats; perturbation shares are
    ||e_t||^2 / sum ||e_u||^2 of its perturbation norms; the model runs no forward pass for them."""
    model, (x, y) = tiny_cnn(), (torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    model.train()
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.05, percentile=0.8)
    tracker = SharpnessTracker(model, F.cross_entropy, (x, y), measures=["masks"])
    _zsharp_step(model, opt, x, y)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    row = tracker.step(0, optimizer=opt)[0]
    handle.remove()
    assert calls == []
    stats = opt.mask_stats.set_index("layer")
    norms2 = stats["perturbation_norm"] ** 2
    for layer, vals in row.layers.items():
        assert vals["kept_fraction"] == pytest.approx(stats.loc[layer, "kept_fraction"])
        assert vals["threshold"] == pytest.approx(stats.loc[layer, "threshold"])
        assert vals["perturbation_share"] == pytest.approx(norms2[layer] / norms2.sum())
    assert row.values["kept_fraction"] == pytest.approx(stats["kept"].sum() / stats["numel"].sum())


def test_zscores_kurtosis_and_tail_mass_against_numpy():
    """Per-layer excess kurtosis and P(|z| > 3) of the probe gradient's Z-scores, recomputed with numpy from
    a gradient taken here with autograd in eval mode."""
    model, data = tiny_mlp(), mlp_data()
    row = SharpnessTracker(model, F.cross_entropy, data, measures=["zscores"]).step(0).pop()
    g = torch.autograd.grad(F.cross_entropy(model(data[0]), data[1]), [model[0].weight])[0].numpy().ravel()
    z = (g - g.mean()) / (g.std(ddof=1) + 1e-12)
    c = z - z.mean()
    assert row.layers["0.weight"]["kurtosis"] == pytest.approx(np.mean(c**4) / np.mean(c**2) ** 2 - 3, rel=1e-9)
    assert row.layers["0.weight"]["tail_mass"] == pytest.approx(np.mean(np.abs(z) > 3))
    assert set(row.histograms) == {"0.weight", "2.weight"}


def _snapshot(model: nn.Module) -> list:
    return ([p.detach().clone() for p in model.parameters()], [None if p.grad is None else p.grad.clone()
                                                                 for p in model.parameters()],
            [b.clone() for b in model.buffers()], [m.training for m in model.modules()])


def test_tracking_leaves_model_and_training_untouched():
    """With every measure on, parameters, .grad, buffers and train flags are bit-identical after each event,
    and a run with tracking ends at exactly the weights of the same run without it."""
    data = (torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    finals = []
    for track in (False, True):
        model = tiny_cnn()
        model.train()
        opt = ZSharp(model.named_parameters(), torch.optim.Adam, lr=0.01)
        tracker = SharpnessTracker(model, F.cross_entropy, data, every=2, measures=[
            "lambda_max", "preconditioned", "trace", "update_curvature", "masks", "zscores"]) if track else None
        for step in range(4):
            _zsharp_step(model, opt, *data)
            model[0].weight.grad = torch.ones_like(model[0].weight)  # a gradient the tracker must keep
            if tracker is not None:
                before = _snapshot(model)
                tracker.step(step, optimizer=opt)
                after = _snapshot(model)
                for u, v in zip(before[:3], after[:3]):
                    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(u, v))
                assert before[3] == after[3]
            opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert set(tracker.to_dataframe()["measure"]) == {"lambda_max", "preconditioned", "trace", "update_curvature",
                                                      "masks", "zscores"}


def test_resumed_tracker_rows_equal_uninterrupted_rows(tmp_path):
    """Stop after 6 steps, save model, optimizer and tracker state (torch.save round trip), rebuild and go on:
    the rows of steps 6-11 equal those of one uninterrupted run (warm-start vector and previous weights kept),
    and the JSONL file keeps the earlier rows exactly once."""
    data = mlp_data()
    measures = ["lambda_max", "update_curvature"]
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    full = SharpnessTracker(model, F.cross_entropy, data, every=3, measures=measures)
    _train(model, opt, data, 12, full)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = SharpnessTracker(model, F.cross_entropy, data, every=3, measures=measures, folder=tmp_path)
    _train(model, opt, data, 6, first)
    first.close()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tracker": first.state_dict()}, tmp_path / "c")
    saved = torch.load(tmp_path / "c", weights_only=False)
    model = tiny_mlp(seed=5)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    second = SharpnessTracker(model, F.cross_entropy, data, every=3, measures=measures, folder=tmp_path,
                              resume_step=6)
    second.load_state_dict(saved["tracker"])
    _train(model, opt, data, 6, second, start=6)
    second.close()
    expected = full.to_dataframe()
    got = second.to_dataframe()
    assert len(got) and got.equals(expected[expected["step"] >= 6].reset_index(drop=True))
    from sharpscope.track import read_tracking

    assert read_tracking(tmp_path).equals(expected)


def test_first_samples_takes_a_prefix_across_batches():
    """first_samples keeps the first n examples in order, crossing batch boundaries (checked by value)."""
    batches = [(torch.arange(3), torch.arange(3)), (torch.arange(3, 6), torch.arange(3, 6))]
    got = first_samples(batches, 4)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.arange(4))


@pytest.mark.parametrize("kwargs, message", [
    ({"measures": ["lambda_max", "sharpness"]}, "unknown measure 'sharpness'"),
    ({"measures": "lambda_max,lambda_max"}, "each measure may be tracked once"),
    ({"loggers": ["tensorboard"]}, "need folder="),
    ({"every": 0}, "every"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    """Unknown or repeated measures, named loggers without a folder and a zero period are refused up front."""
    model, data = tiny_mlp(), mlp_data()
    with pytest.raises(UserInputError, match=message):
        SharpnessTracker(model, F.cross_entropy, data, **kwargs)


@pytest.mark.parametrize("measure, optimizer", [("masks", "sgd"), ("masks", None), ("preconditioned", "rmsprop"),
                                                ("preconditioned", None)])
def test_measures_refuse_an_optimizer_they_cannot_read(measure, optimizer):
    """masks needs ZSharp's statistics, preconditioned an Adam-type or SGD optimizer: one line, before work."""
    model, data = tiny_mlp(), mlp_data()
    opt = {"sgd": torch.optim.SGD(model.parameters(), lr=0.1),
           "rmsprop": torch.optim.RMSprop(model.parameters()), None: None}[optimizer]
    with pytest.raises(UserInputError, match=measure):
        SharpnessTracker(model, F.cross_entropy, data, measures=[measure]).step(0, optimizer=opt)


def test_run_tracker_probes_the_first_training_examples_and_writes_jsonl(tmp_path):
    """run_tracker (what fit and the CLI use) takes the first `samples` normalised training images as one
    probe batch, writes tracking.jsonl into the run folder, and names a bad measure or logger in one line."""
    from sharpscope.data.synthetic import load_synthetic
    from sharpscope.track import read_tracking
    from sharpscope.track.run import run_tracker

    data = load_synthetic(num_examples=12, image_size=6, channels=1, num_classes=3)
    model = tiny_cnn().float()
    tracker = run_tracker(model, F.cross_entropy, data, tmp_path, track="lambda_max,trace", every=2, samples=8)
    x, y = tracker.batches[0]
    assert torch.equal(x, data.normalized(data.inputs[:8])) and torch.equal(y, data.targets[:8])
    tracker.step(0)
    tracker.close()
    assert list(read_tracking(tmp_path)["measure"]) == ["lambda_max", "trace"]
    with pytest.raises(UserInputError, match="unknown logger 'neptune'"):
        run_tracker(model, F.cross_entropy, data, tmp_path, log="tensorboard,neptune")
    with pytest.raises(UserInputError, match="unknown measure 'sharp'"):
        run_tracker(model, F.cross_entropy, data, tmp_path, track="sharp")


def test_preconditioned_waits_for_the_optimizers_first_step():
    """Before Adam has second moments there is no preconditioner: no row (not a NaN); after one step, a row."""
    model, data = tiny_mlp(), mlp_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = SharpnessTracker(model, F.cross_entropy, data, every=1, measures=["preconditioned"])
    assert tracker.step(0, optimizer=opt) == []
    _train(model, opt, data, 1)
    assert [r.measure for r in tracker.step(1, optimizer=opt)] == ["preconditioned"]
