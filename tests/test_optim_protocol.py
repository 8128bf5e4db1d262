"""The two-pass protocol: checkpoints, schedulers, groups, restoring, AMP, bad input, no host sync."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from sharpscope.errors import UserInputError
from sharpscope.optim import ASAM, MASK_STATS_COLUMNS, SAM, FriendlySAM, ZSharp, frozen_running_stats
from tests.test_optim_reference import formula_quantile

FACTORIES = {
    "sam": lambda ps, **kw: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "asam": lambda ps, **kw: ASAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "fsam": lambda ps, **kw: FriendlySAM(ps, torch.optim.Adam, lr=1e-2, **kw),
    "zsharp": lambda ps, **kw: ZSharp(ps, torch.optim.Adam, lr=1e-2, **kw),
}


def model_with_bn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def two_pass(model, opt, x, y, **second):
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True, **second)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_resume_is_bit_for_bit(name):
    """Resume from state_dict (through torch.save/torch.load weights_only) = uninterrupted run, bitwise.

    The reference is the same optimizer run without interruption; base momentum/Adam moments and
    F-SAM's m must travel in the checkpoint for the third step to agree.
    """
    model = model_with_bn()
    opt = FACTORIES[name](model.named_parameters())
    for step in range(2):
        two_pass(model, opt, *data(step))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    two_pass(model, opt, *data(2))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = model_with_bn()
    resumed.load_state_dict(saved["model"])
    opt2 = FACTORIES[name](resumed.named_parameters())
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    two_pass(resumed, opt2, *data(2))
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_without_base_is_refused():
    """Loading a plain optimizer's state_dict names what is missing."""
    model = model_with_bn()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(UserInputError, match="base"):
        opt.load_state_dict(plain)


def test_lr_scheduler_on_wrapper_reaches_base_without_warning():
    """StepLR attached to the wrapper changes the base optimizer's lr; no 'step order' warning."""
    model = model_with_bn()
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            two_pass(model, opt, *data(step))
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"]


def test_per_group_rho_and_global_norm():
    """A group with rho=0 is not perturbed; the other gets rho * g / ||g|| with ||g|| over both groups
    (and only over the optimizer's parameters: the BatchNorm ones are left out here)."""
    model = model_with_bn()
    conv, lin = model[0], model[4]
    opt = SAM([{"params": conv.parameters(), "rho": 0.0}, {"params": lin.parameters()}], torch.optim.SGD, rho=0.3, lr=0.1)
    x, y = data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    mine = [conv.weight, lin.weight, lin.bias]
    w0 = [p.detach().clone() for p in mine]
    grads = [p.grad.clone() for p in mine]
    gnorm = torch.stack([g.norm() for g in grads]).norm()
    opt.first_step()
    assert torch.equal(conv.weight, w0[0])
    for p, w, g in zip(mine[1:], w0[1:], grads[1:]):
        torch.testing.assert_close(p.detach(), w + 0.3 * g / (gnorm + 1e-12))
    opt.restore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_add_param_group_shared_with_base():
    """add_param_group on the wrapper reaches the base optimizer, with the wrapper's defaults."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 2)
    opt = ZSharp(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.add_param_group({"params": b.parameters(), "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.1 and opt.param_groups[1]["percentile"] == 0.95
    with pytest.raises(UserInputError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "rho": -1.0})


def test_restores_exactly_the_perturbed_tensors():
    """A tensor perturbed in pass 1 but without a gradient in pass 2 is still restored bit for bit.

    Frozen and grad-less parameters are never touched.
    """
    torch.manual_seed(0)
    used, unused, frozen = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    frozen.requires_grad_(False)
    params = list(used.named_parameters()) + [("u." + n, p) for n, p in unused.named_parameters()]
    params += [("f." + n, p) for n, p in frozen.named_parameters()]
    snapshot = {n: p.detach().clone() for n, p in params}
    opt = ZSharp(params, torch.optim.SGD, lr=0.1)
    x = torch.randn(5, 4)
    frozen(used(x)).pow(2).mean().backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(used.weight, snapshot["weight"])
    for n, p in params[2:]:
        assert torch.equal(p, snapshot[n])
    # Pass 2 reaches only the bias of `used` (weight gets no gradient).
    used.bias.sum().backward()
    opt.second_step()
    assert torch.equal(used.weight, snapshot["weight"])
    torch.testing.assert_close(used.bias.detach(), snapshot["bias"] - 0.1)
    for n, p in params[2:]:
        assert torch.equal(p, snapshot[n])


def test_zsharp_edge_cases_zero_constant_single():
    """All-zero gradients give e = 0 (no NaN); a constant-gradient tensor and a one-element weight use the
    SAM fallback rho * g / ||g||, reported as fallback in mask_stats."""
    w_const = nn.Parameter(torch.zeros(3, 4))
    w_one = nn.Parameter(torch.zeros(1, 1))
    w_rand = nn.Parameter(torch.zeros(6, 5))
    bias = nn.Parameter(torch.zeros(4))
    named = [("const", w_const), ("one", w_one), ("rand", w_rand), ("bias", bias)]
    opt = ZSharp(named, torch.optim.SGD, rho=0.05, lr=0.1)
    for p in (w_const, w_one, w_rand, bias):
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for p in (w_const, w_one, w_rand, bias):
        assert torch.equal(p.detach(), torch.zeros_like(p))
    opt.restore()

    w_const.grad = torch.full_like(w_const, 0.3)
    w_one.grad = torch.full_like(w_one, -2.0)
    w_rand.grad = torch.randn_like(w_rand)
    bias.grad = torch.randn_like(bias)
    gnorm = torch.stack([p.grad.norm() for _, p in named]).norm()
    grads = {n: p.grad.clone() for n, p in named}
    opt.first_step()
    for n in ("const", "one", "bias"):
        torch.testing.assert_close(dict(named)[n].detach(), 0.05 * grads[n] / (gnorm + 1e-12))
    assert abs(float(w_rand.detach().norm()) - 0.05) < 1e-7
    stats = opt.mask_stats.set_index("layer")
    assert list(opt.mask_stats.columns) == list(MASK_STATS_COLUMNS)
    assert list(stats.index) == ["const", "one", "rand"]
    assert stats.loc["const", "fallback"] and stats.loc["one", "fallback"] and not stats.loc["rand", "fallback"]
    assert stats.loc["const", "kept"] == 0 and stats.loc["rand", "kept"] == 2  # 0.95*29 = 27.55: v[28], v[29] > tau


def test_mask_stats_values_against_reference():
    """mask_stats vs recomputation by hand (threshold by the linear-interpolation formula in float64, see
    test_optim_reference.formula_quantile): kept, threshold, norms; names and param<i>."""
    model = model_with_bn()
    for params, names in ((model.named_parameters(), ["0.weight", "4.weight"]), (model.parameters(), ["param0", "param3"])):
        opt = ZSharp(params, torch.optim.SGD, rho=0.1, percentile=0.9, lr=0.1)
        assert opt.mask_stats.empty and list(opt.mask_stats.columns) == list(MASK_STATS_COLUMNS)
        x, y = data(1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        weights = [model[0].weight, model[4].weight]
        grads = [w.grad.clone() for w in weights]
        opt.first_step()
        stats = opt.mask_stats
        assert list(stats["layer"]) == names
        for row, g in zip(stats.itertuples(), grads):
            z = ((g - g.mean()) / (g.std() + 1e-12)).abs()
            tau = formula_quantile(z, 0.9)
            assert row.numel == g.numel() and row.kept == int((z.double() > tau).sum())
            assert row.kept_fraction == pytest.approx(row.kept / g.numel())
            assert row.threshold == pytest.approx(float(tau), rel=1e-6)
            assert row.grad_norm == pytest.approx(float(g.norm()), rel=1e-6)
            assert row.perturbation_norm == pytest.approx(0.1, rel=1e-6)
            assert not row.fallback
        opt.restore()


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_grad_scaler_skips_step_when_a_pass_is_not_finite(bad_pass):
    """GradScaler recipe: inf/NaN in pass 1 or pass 2 -> weights exactly as before, no NaN, scale lowered.

    With finite gradients and a power-of-two scale the AMP step equals the plain step bit for bit.
    """
    model = model_with_bn()
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(0)
    before = copy.deepcopy(model.state_dict())
    params = dict(model.named_parameters())

    scaler.scale(loss_fn(model(x), y)).backward()
    if bad_pass == 1:
        params["4.weight"].grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    if bad_pass == 2:
        params["0.weight"].grad[0, 0, 0, 0] = float("nan")
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert scaler.get_scale() == 8.0

    # Finite step: same as without the scaler.
    plain = model_with_bn()
    plain.load_state_dict(model.state_dict())
    opt_plain = ZSharp(plain.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    two_pass(plain, opt_plain, x, y)
    model.load_state_dict(before)
    scaler.scale(loss_fn(model(x), y)).backward()
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_nan_gradient_does_not_break_restore():
    """NaN in the pass-1 gradient: first_step runs (NaN perturbation), restore() gives w back exactly."""
    for factory in FACTORIES.values():
        model = model_with_bn()
        opt = factory(model.named_parameters())
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        model[4].weight.grad[0, 0] = float("nan")
        opt.first_step()
        opt.restore()
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


class _NoHostSync:
    """Make every tensor -> Python conversion raise (what a device sync would need)."""

    names = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def refuse(*args, **kwargs):
            raise AssertionError("host-device synchronisation inside first_step")

        for n in self.names:
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("options", [{}, {"perturb_norm": "global", "threshold_scope": "global"}])
def test_zsharp_first_step_never_reads_a_tensor_value_on_the_host(options):
    """first_step with tensor->Python conversions disabled (they would sync a GPU) still runs and
    gives the same perturbation as with them allowed."""
    model = model_with_bn()
    x, y = data(0)
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1, **options)
    nn.functional.cross_entropy(model(x), y).backward()
    model[4].weight.grad[:, :] = 1.0  # exercise the fallback branch too
    reference = copy.deepcopy(model)
    for a, b in zip(model.parameters(), reference.parameters()):
        b.grad = a.grad.clone()
    ref_opt = ZSharp(reference.named_parameters(), torch.optim.SGD, lr=0.1, **options)
    ref_opt.first_step()
    with _NoHostSync():
        opt.first_step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zsharp_first_step_no_cuda_sync():
    """On CUDA, torch's sync debug mode raises on any synchronising call inside first_step."""
    model = model_with_bn().cuda()
    x, y = (t.cuda() for t in data(0))
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(opt.mask_stats) == 2


def test_frozen_running_stats_keeps_bn_buffers_in_train_mode():
    """Inside the context BN normalises with batch statistics (train mode) but its running stats and
    counter come out unchanged; momentum is restored (including None)."""
    model = model_with_bn()
    model[1].momentum = None
    model.train()
    x, _ = data(0)
    model(x)
    before = copy.deepcopy(model[1].state_dict())
    with frozen_running_stats(model):
        assert model.training and model[1].training
        out = model(x)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[1].momentum is None
    model.eval()
    assert not torch.equal(model(x), out)  # pass 2 used batch statistics, not running ones


def test_bad_input_errors():
    """Invalid arguments raise ValueError naming the argument; protocol misuse raises RuntimeError."""
    ps = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="rho"):
        SAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1)
    for p in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="percentile"):
            ZSharp(ps, torch.optim.SGD, percentile=p, lr=0.1)
    with pytest.raises(ValueError, match="perturb_norm"):
        ZSharp(ps, torch.optim.SGD, perturb_norm="layer", lr=0.1)
    with pytest.raises(ValueError, match="threshold_scope"):
        ZSharp(ps, torch.optim.SGD, threshold_scope="layer", lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(ps, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="variant"):
        ASAM(ps, torch.optim.SGD, variant="other", lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        ASAM(ps, torch.optim.SGD, eta=-1, lr=0.1)
    with pytest.raises(ValueError, match="lmbda"):
        FriendlySAM(ps, torch.optim.SGD, lmbda=1.5, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        ZSharp([{"params": ps, "rho": -1.0}], torch.optim.SGD, lr=0.1)
    opt = ZSharp(ps, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_asam_without_names_warns_and_adapts_every_tensor():
    """Unnamed parameters: a warning, and T = |w| + eta on every tensor (checked by hand)."""
    lin = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="named_parameters"):
        opt = ASAM(lin.parameters(), torch.optim.SGD, lr=0.1)
    w0 = [p.detach().clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.grad = torch.randn_like(p)
    t = [w.abs() + 0.01 for w in w0]
    grads = [p.grad.clone() for p in lin.parameters()]
    n = torch.stack([(ti * g).norm() for ti, g in zip(t, grads)]).norm() + 1e-16
    opt.first_step()
    for p, w, ti, g in zip(lin.parameters(), w0, t, grads):
        torch.testing.assert_close(p.detach(), w + 0.5 * ti * ti * g / n)
