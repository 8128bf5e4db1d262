"""backend="pyhessian": runs the installed PyHessian on CPU and today's torch, and agrees with our engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.hessian import hessian_density, hessian_eigenvalues, hessian_trace
from tests._curvature_models import exact_hessian, mlp_data, tiny_mlp

pytest.importorskip("pyhessian")
CE = nn.CrossEntropyLoss()
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def resnet_batch():
    from sharpscope.models.resnet_cifar import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(20, 10)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    with torch.no_grad():
        model.train()
        model(x)
    model.eval()
    return model, (x, y)


def test_top_eigenvalue_agrees_with_pyhessian_on_resnet20(resnet_batch) -> None:
    """ResNet-20 on 16 CIFAR-shaped images: our Lanczos top eigenvalue vs PyHessian's power iteration,
    1e-2 relative; PyHessian's HVPs are counted and its eigenvector residual measured."""
    model, data = resnet_batch
    ours = hessian_eigenvalues(model, CE, data, k=1, tol=1e-4, **QUIET)
    theirs = hessian_eigenvalues(model, CE, data, k=1, tol=1e-4, backend="pyhessian", **QUIET)
    assert ours.converged and theirs.n_hvp >= 2
    assert abs(theirs.eigenvalues[0] - ours.eigenvalues[0]) <= 1e-2 * abs(ours.eigenvalues[0])
    assert theirs.eigenvectors.shape == (sum(p.numel() for p in model.parameters()), 1)
    assert 0 < theirs.residuals[0] < 1


def test_stale_grad_is_ignored_and_model_restored() -> None:
    """PyHessian adds stale .grad into its gradient; the backend zeroes it first (same numbers as with no
    .grad) and puts every .grad, parameter and flag back. Checked against the exact top eigenvalue."""
    model, data = tiny_mlp(), mlp_data()
    truth = np.linalg.eigvalsh(exact_hessian(model, CE, *data))[-1]
    clean = hessian_eigenvalues(model, CE, data, k=1, tol=1e-6, seed=1, backend="pyhessian", **QUIET)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stale = hessian_eigenvalues(model, CE, data, k=1, tol=1e-6, seed=1, backend="pyhessian", **QUIET)
    assert stale.eigenvalues[0] == clean.eigenvalues[0]
    assert abs(clean.eigenvalues[0] - truth) <= 1e-3 * abs(truth)
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_trace_and_density_run_on_cpu_without_torch_eig() -> None:
    """PyHessian's trace and density (which calls the removed torch.eig) run on CPU; trace vs the exact
    trace within 3 standard errors, SLQ zeroth and first moments vs 1 and the same-probe exact value."""
    model, data = tiny_mlp(), mlp_data()
    H = exact_hessian(model, CE, *data)
    original_eig = getattr(torch, "eig", None)  # today's torch: a stub that raises
    tr = hessian_trace(model, CE, data, n_samples=50, tol=1e-4, backend="pyhessian", **QUIET)
    assert tr.n_hvp == len(tr.samples) >= 2
    assert abs(tr.estimate - np.trace(H)) <= 3 * tr.stderr
    d = hessian_density(model, CE, data, n_iter=6, n_runs=40, backend="pyhessian", **QUIET)
    assert d.n_hvp == 6 * 40
    for weights in d.weights:
        assert abs(weights.sum() - 1) < 1e-5
    ours = hessian_density(model, CE, data, n_iter=6, n_runs=40, **QUIET)
    se = np.std([np.sum(w * n) for n, w in zip(d.nodes, d.weights)], ddof=1) / np.sqrt(40)
    assert abs(d.moments(1)[1] - np.trace(H) / len(H)) <= 4 * se
    assert abs(ours.moments(1)[1] - np.trace(H) / len(H)) <= 4 * se
    assert getattr(torch, "eig", None) is original_eig  # the replacement lived only inside the call


def test_progress_argument_draws_a_bar_only_when_asked(capsys, monkeypatch) -> None:
    """progress=True shows a bar over PyHessian's products on stderr (0.1 ignored the argument);
    progress=False writes nothing. The numbers do not depend on it (same seed, same products)."""
    monkeypatch.setenv("SHARPSCOPE_PROGRESS", "always")  # captured stderr is not a terminal
    model, data = tiny_mlp(), mlp_data()
    quiet = hessian_trace(model, CE, data, n_samples=5, tol=1e-9, backend="pyhessian", progress=False)
    assert capsys.readouterr().err == ""
    loud = hessian_trace(model, CE, data, n_samples=5, tol=1e-9, backend="pyhessian", progress=True)
    err = capsys.readouterr().err
    assert "PyHessian trace" in err and "/5 " in err  # the total: at most n_samples probes
    np.testing.assert_array_equal(loud.samples, quiet.samples)
    hessian_eigenvalues(model, CE, data, k=1, max_iter=3, backend="pyhessian", progress=True)
    assert "PyHessian top-1" in capsys.readouterr().err
    hessian_density(model, CE, data, n_iter=3, backend="pyhessian", progress=True)
    assert "PyHessian SLQ" in capsys.readouterr().err
    hessian_eigenvalues(model, CE, data, k=1, max_iter=3, backend="pyhessian", progress=False)
    assert capsys.readouterr().err == ""


def _trained_tiny_vit():
    """A float64 ViT (2x2 patches of 4x4 images, width 4, one block) after 60 Adam steps: near a minimum,
    its top eigenvalue is positive and well separated (power iteration converges in a few products)."""
    import sharpscope

    model = sharpscope.build_model("vit", num_classes=3, seed=0, image_size=4, patch_size=2, in_channels=1, dim=4,
                                   depth=1, heads=2, mlp_dim=8).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), (x, y)


def _reverse_over_reverse_hessian(model, x, y) -> np.ndarray:
    """The exact Hessian by torch.autograd.functional.hessian (reverse-over-reverse; torch.func.hessian is
    wrong through F.layer_norm on torch 2.13), attention on the math kernel."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    named = [(n, p.detach()) for n, p in model.named_parameters()]
    sizes = [p.numel() for _, p in named]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = {n: c.view(p.shape) for (n, p), c in zip(named, torch.split(flat, sizes))}
        return CE(functional_call(model, tensors, (x,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss_of, torch.cat([p.reshape(-1) for _, p in named])).numpy()
    assert np.abs(H - H.T).max() <= 1e-12 * np.abs(H).max()
    return H


def test_pyhessian_runs_on_a_vision_transformer() -> None:
    """PyHessian differentiates twice through F.scaled_dot_product_attention, whose fused CPU kernel has no
    double backward (it raised before the backend ran it under math_attention). Tiny float64 ViT: its
    top eigenvalue (power iteration, tol 1e-6) agrees with ours and with eigvalsh of the exact
    reverse-over-reverse Hessian within 10 tol relative; its Hutchinson trace is within 3 standard errors
    of the exact trace."""
    model, (x, y) = _trained_tiny_vit()
    ev = np.linalg.eigvalsh(H := _reverse_over_reverse_hessian(model, x, y))
    ours = hessian_eigenvalues(model, CE, (x, y), k=1, tol=1e-8, **QUIET)
    theirs = hessian_eigenvalues(model, CE, (x, y), k=1, tol=1e-6, backend="pyhessian", **QUIET)
    assert ev[-1] > 2 * max(abs(ev[0]), ev[-2])  # power iteration's premise: a dominant top eigenvalue
    assert abs(ours.eigenvalues[0] - ev[-1]) <= 1e-8 * ev[-1]
    assert theirs.converged and theirs.settings["backend"] == "pyhessian"
    assert abs(theirs.eigenvalues[0] - ours.eigenvalues[0]) <= 1e-5 * ours.eigenvalues[0]
    assert theirs.residuals[0] < 1e-2  # its eigenvector, checked with our operator
    tr = hessian_trace(model, CE, (x, y), n_samples=30, tol=1e-9, backend="pyhessian", **QUIET)
    assert tr.n_hvp == 30 and abs(tr.estimate - np.trace(H)) <= 3 * tr.stderr
