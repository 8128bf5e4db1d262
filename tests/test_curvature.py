"""The Hessian operator: exact products, batch weighting, fallback, leaving the model as found, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.curvature import HessianOperator
from sharpscope.errors import UserInputError
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
    """torch.func cannot transform an old-style autograd.Function: hvp="func" warns once, when the operator
    is built, and the double-backward products equal the exact Hessian (torch.autograd.functional)."""
    torch.manual_seed(0)
    model = _ItemModel()
    x, y = mlp_data()
    with pytest.warns(RuntimeWarning, match="falling back"):
        op = HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], hvp="func")
    with op, warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning, no further switch
        assert op.method == "autograd" and "setup_context" in op.fallback_reason
        first = op.matvec(torch.eye(op.dim, dtype=torch.float64)[0])
        H = dense(op)
        assert op.method == "autograd"
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
    ones = torch.ones(model[0].weight.numel() + 8 + 24 + 3, dtype=torch.float64)
    for hvp in ("func", "cached", "autograd"):  # "func" meets them in its trial product, at construction
        with pytest.raises(ValueError, match="scalar"):
            HessianOperator(model, no_reduce, (x, y), hvp=hvp).matvec(ones)
        bad = x.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="not finite"):
            HessianOperator(model, CE, (bad, y), hvp=hvp).matvec(ones)
    with pytest.raises(ValueError, match="hvp must be"):
        HessianOperator(model, CE, (x, y), hvp="magic")
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator(frozen, CE, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good call warns about nothing
        HessianOperator(model, CE, (x, y)).matvec(torch.ones(model[0].weight.numel() + 8 + 24 + 3,
                                                             dtype=torch.float64))


class _NoJvpTanh(torch.autograd.Function):
    """tanh with setup_context and backward but no jvp: forward-mode AD (torch.func.jvp) is unsupported,
    double backward works."""

    @staticmethod
    def forward(x):  # noqa: ANN001, ANN205
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _Switchable(nn.Module):
    """A linear-tanh model using _NoJvpTanh, or one that raises a RuntimeError once ``fail`` is set."""

    def __init__(self, no_jvp: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3).double()
        self.no_jvp = no_jvp
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom: a failure of the model itself")
        return _NoJvpTanh.apply(self.lin(x)) if self.no_jvp else torch.tanh(self.lin(x))


def test_auto_picks_double_backward_at_build_when_forward_mode_is_unsupported() -> None:
    """hvp="auto" with several batches tries torch.func; a model without forward-mode AD gets "autograd"
    chosen at construction (no warning: auto), keeps it for every product, and the products equal
    those of the same model written with torch.tanh (whose func HVP is checked against torch.func.hessian
    above)."""
    x, y = mlp_data()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    torch.manual_seed(0)
    odd = _Switchable(no_jvp=True)
    torch.manual_seed(0)
    plain = _Switchable(no_jvp=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = HessianOperator(odd, CE, batches)
        ref = HessianOperator(plain, CE, batches, hvp="func")
    assert op.method == "autograd" and op.fallback_reason.startswith("NotImplementedError")
    assert op.trial_seconds == {}  # nothing to time: only one method works
    assert ref.method == "func" and ref.fallback_reason is None
    assert op.n_hvp == 0  # the trial product is not counted
    np.testing.assert_allclose(dense(op), dense(ref), rtol=0, atol=1e-13)
    assert op.method == "autograd"


def test_method_stays_fixed_and_later_errors_propagate() -> None:
    """Once built with "func", a RuntimeError raised later by the model propagates unchanged: no silent
    switch to another method half-way through a run. A model error that every method raises at
    construction propagates too (it is not taken for "torch.func unsupported")."""
    model = _Switchable()
    x, y = mlp_data()
    op = HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], hvp="func")
    assert op.method == "func"
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    model.fail = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="boom"):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert op.method == "func" and op.n_hvp == 1
    with pytest.raises(RuntimeError, match="boom"):
        HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], hvp="func")
    model.fail = False
    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # 4 features for a 5-input layer
        HessianOperator(model, CE, [(x[:20, :4], y[:20]), (x[20:, :4], y[20:])])


def test_non_finite_weights_refused_when_the_operator_is_built() -> None:
    """A NaN weight is refused at construction with one line naming the tensor (0.1 built the operator and
    failed later with a FloatingPointError from inside a product)."""
    model = tiny_mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(UserInputError, match=r"2\.bias") as info:
        HessianOperator(model, CE, mlp_data())
    assert "\n" not in str(info.value)


def test_auto_times_both_methods_once_and_keeps_the_faster() -> None:
    """hvp="auto": one batch -> "cached" without a trial; several batches -> one timed trial product per
    method at construction, the faster kept (the choice is the argmin of the recorded times) and never
    re-timed; an explicit method is taken as given, untimed."""
    model = tiny_mlp()
    x, y = mlp_data()
    single = HessianOperator(model, CE, (x, y))
    assert single.method == "cached" and single.trial_seconds == {}
    op = HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])])
    assert set(op.trial_seconds) == {"func", "autograd"} and all(t > 0 for t in op.trial_seconds.values())
    assert op.method == min(op.trial_seconds, key=op.trial_seconds.__getitem__)
    times = dict(op.trial_seconds)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert op.trial_seconds == times and op.n_hvp == 1
    for method in ("func", "autograd"):  # a block takes the shared-graph path either way: same products
        op.method = method
        V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(op.matmat(V).numpy(), exact_hessian(model, CE, x, y) @ V.numpy(), atol=1e-12)
    for hvp in ("func", "autograd", "cached"):
        explicit = HessianOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], hvp=hvp)
        assert explicit.method == hvp and explicit.trial_seconds == {}


@pytest.mark.parametrize("hvp", ["func", "cached", "autograd"])
def test_matmat_equals_stacked_matvecs(hvp: str) -> None:
    """matmat(V) is the (dim, k) block of matvec(V[:, j]) (the exact Hessian times V on unequal batches),
    counts k products, and refuses a block of the wrong shape."""
    model = tiny_cnn()
    x, y = cnn_data()
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    V = torch.randn(0, 1, dtype=torch.float64)
    with HessianOperator(model, CE, batches, hvp=hvp) as op:
        V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        block = op.matmat(V)
        assert block.shape == (op.dim, 3) and op.n_hvp == 3
        cols = torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1)
        with pytest.raises(ValueError, match="shape"):
            op.matmat(V[:-1])
    np.testing.assert_allclose(block.numpy(), cols.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(block.numpy(), exact_hessian(model, CE, x, y) @ V.numpy(), rtol=0, atol=1e-12)


def test_batch_norm_without_running_statistics_is_left_to_torch() -> None:
    """Eval-mode BatchNorm is computed as an affine map inside the operator; a BatchNorm that keeps no
    running statistics (batch statistics even in eval mode) must not be: its products equal
    torch.autograd.functional.hessian of the plain model's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double().eval()
    x, y = cnn_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        return CE(torch.func.functional_call(model, tensors, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = torch.autograd.functional.hessian(loss_of, flat).numpy()
    with HessianOperator(model, CE, (x, y), hvp="cached") as op:
        np.testing.assert_allclose(dense(op), ref, rtol=0, atol=1e-12)
