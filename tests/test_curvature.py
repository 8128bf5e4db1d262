"""The Hessian operator: exact products, batch weighting, fallback, leaving the model as found, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.curvature import HessianOperator
from tests._curvature_models import cnn_data, exact_hessian, mlp_data, tiny_cnn, tiny_mlp

CE = nn.CrossEntropyLoss()


def dense(op: HessianOperator) -> np.ndarray:
    eye = torch.eye(op.dim, dtype=op.dtype)
    return torch.stack([op.matvec(e) for e in eye]).numpy()


@pytest.mark.parametrize("hvp", ["func", "cached", "autograd"])
@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_matvec_matches_exact_hessian(hvp: str, make: str) -> None:
    """Every HVP method reproduces torch.func.hessian of the loss (tiny MLP; CNN with BatchNorm in eval)."""
    model, (x, y) = (tiny_mlp(), mlp_data()) if make == "mlp" else (tiny_cnn(), cnn_data())
    with HessianOperator(model, CE, (x, y), hvp=hvp) as op:
        H = dense(op)
        assert op.n_hvp == op.dim
    np.testing.assert_allclose(H, exact_hessian(model, CE, x, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("hvp", ["func", "cached", "autograd"])
def test_unequal_batches_give_hessian_of_concatenated_data(hvp: str) -> None:
    """Batches of 7, 13 and 32 examples give the exact Hessian of the single concatenated batch."""
    model = tiny_mlp()
    x, y = mlp_data(52)
    batches = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    with HessianOperator(model, CE, batches, hvp=hvp) as op:
        H = dense(op)
    np.testing.assert_allclose(H, exact_hessian(model, CE, x, y), rtol=0, atol=1e-12)


def test_float64_option_and_frozen_parameters_excluded() -> None:
    """dtype=float64 on a float32 model, and requires_grad=False tensors excluded: the block of the
    exact float64 Hessian over the trainable tensors."""
    model = tiny_mlp().float()
    model[0].bias.requires_grad_(False)
    x, y = mlp_data()
    with HessianOperator(model, CE, (x.float(), y), dtype=torch.float64) as op:
        assert op.dtype == torch.float64
        assert op.param_names == ["0.weight", "2.weight", "2.bias"]
        H = dense(op)
    ref = exact_hessian(tiny_mlp(), CE, x, y, names=["0.weight", "2.weight", "2.bias"])
    # The float32 weights differ from the float64 model's by float32 rounding only.
    np.testing.assert_allclose(H, ref, atol=1e-6)
    assert model[0].bias.requires_grad is False


def test_model_left_bit_for_bit_unchanged() -> None:
    """Parameters, buffers, .grad, requires_grad and each module's train flag are exactly as before."""
    model = tiny_cnn().float()
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[4].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    x, y = cnn_data()
    for hvp in ("func", "cached", "autograd"):
        op = HessianOperator(model, CE, (x.float(), y), hvp=hvp)  # also outside a with-block
        op.matvec(torch.randn(op.dim))
        with HessianOperator(model, CE, [(x[:5].float(), y[:5]), (x[5:].float(), y[5:])], hvp=hvp) as op:
            op.matvec(torch.randn(op.dim))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == flags
    assert model[4].bias.requires_grad is False


def test_flatten_unflatten_and_linear_operator() -> None:
    """unflatten/flatten are inverse; the scipy LinearOperator gives the same product as matvec."""
    model = tiny_mlp()
    with HessianOperator(model, CE, mlp_data()) as op:
        v = torch.randn(op.dim, dtype=torch.float64)
        parts = op.unflatten(v)
        assert [tuple(p.shape) for p in parts] == [tuple(s) for s in op.shapes]
        assert torch.equal(op.flatten(parts), v)
        lin = op.as_linear_operator()
        np.testing.assert_allclose(lin.matvec(v.numpy()), op.matvec(v).numpy(), rtol=0, atol=1e-14)
        assert op.n_hvp == 2
        with pytest.raises(ValueError, match="length dim"):
            op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))


class _OldStyleTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function (ctx in forward, no jvp): torch.func cannot transform it,
    while its differentiable backward supports double backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        out = torch.tanh(x)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _ItemModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OldStyleTanh.apply(self.lin(x))


def test_fallback_to_double_backward_when_torch_func_fails() -> None:
    """torch.func cannot transform an old-style autograd.Function: a warning, then double-backward results equal the exact Hessian."""
    torch.manual_seed(0)
    model = _ItemModel()
    x, y = mlp_data()
    with HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], hvp="func") as op:
        with pytest.warns(RuntimeWarning, match="falling back"):
            first = op.matvec(torch.eye(op.dim, dtype=torch.float64)[0])
        assert op.method == "autograd"
        H = dense(op)
    np.testing.assert_allclose(H[0], first.numpy(), atol=1e-14)
    params = dict(model.named_parameters())

    def loss_of(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return CE(torch.tanh(x @ w.T + b), y)

    Hw = torch.autograd.functional.hessian(loss_of, (params["lin.weight"].detach(), params["lin.bias"].detach()))
    ref = torch.cat([torch.cat([Hw[i][j].reshape(params[a].numel(), params[b].numel()) for j, b in
                                enumerate(["lin.weight", "lin.bias"])], dim=1)
                     for i, a in enumerate(["lin.weight", "lin.bias"])]).numpy()
    np.testing.assert_allclose(H, ref, atol=1e-12)


def test_bad_input_is_named() -> None:
    """Empty data, a non-scalar loss and a non-finite loss raise clear errors instead of returning NaN."""
    model = tiny_mlp()
    x, y = mlp_data()
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, CE, [])
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, CE, (x[:0], y[:0]))
    no_reduce = nn.CrossEntropyLoss(reduction="none")
    for hvp in ("func", "cached", "autograd"):
        op = HessianOperator(model, no_reduce, (x, y), hvp=hvp)
        with pytest.raises(ValueError, match="scalar"):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
        bad = x.clone()
        bad[0, 0] = float("nan")
        op = HessianOperator(model, CE, (bad, y), hvp=hvp)
        with pytest.raises(FloatingPointError, match="not finite"):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="hvp must be"):
        HessianOperator(model, CE, (x, y), hvp="magic")
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator(frozen, CE, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good call warns about nothing
        HessianOperator(model, CE, (x, y)).matvec(torch.ones(model[0].weight.numel() + 8 + 24 + 3,
                                                             dtype=torch.float64))
