"""Loss-landscape slices against closed forms (a quadratic model) and hand-written references."""

import copy
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.analysis.directions import Direction, random_directions
from sharpscope.analysis.landscape import Landscape, interpolate, landscape_1d, landscape_2d
from sharpscope.errors import UserInputError


class Quadratic(nn.Module):
    """loss = 1/2 (w - w*)^T A (w - w*) for every sample; w is a (3, 4) matrix (a 'layer' weight)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / 12 + torch.eye(12, dtype=torch.float64))
        self.register_buffer("w_star", torch.randn(12, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.w.reshape(-1) - self.w_star
        return (0.5 * d @ self.A @ d).expand(len(x))

    def formula(self, w: np.ndarray) -> float:
        d = w.reshape(-1) - self.w_star.numpy()
        return float(0.5 * d @ self.A.numpy() @ d)


def mean_out(out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return out.mean()


QDATA = (torch.zeros(4, 1), torch.zeros(4))


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def tiny_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def assert_unchanged(model: nn.Module, snap) -> None:
    state, grads, flags = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == flags


def test_quadratic_2d_slice_equals_formula_on_a_7x11_grid():
    """loss[i, j] = 1/2 (w + x_i d1 + y_j d2 - w*)^T A (...) computed in numpy for a 7 x 11 grid with
    unequal axes; fails if the grid were transposed or the axes swapped."""
    model = Quadratic()
    g = torch.Generator().manual_seed(5)
    d1 = Direction({"w": torch.randn(3, 4, generator=g, dtype=torch.float64)})
    d2 = Direction({"w": torch.randn(3, 4, generator=g, dtype=torch.float64)})
    xs, ys = np.linspace(-1.0, 0.5, 7), np.linspace(-2.0, 3.0, 11)
    land = landscape_2d(model, mean_out, QDATA, directions=[d1, d2], x=xs, y=ys, progress=False)
    assert land.loss.shape == (7, 11) and land.dims == ("x", "y")
    w0, a, b = model.w.detach().numpy(), d1["w"].numpy(), d2["w"].numpy()
    expected = np.array([[model.formula(w0 + x * a + y * b) for y in ys] for x in xs])
    np.testing.assert_allclose(land.loss, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(land.coords["x"], xs)
    assert np.isnan(land.accuracy).all()  # outputs are not class scores: no accuracy, not a fake one
    df = land.to_dataframe()
    assert list(df.columns) == ["x", "y", "loss", "accuracy", "done"] and len(df) == 77
    row = df[(df.x == xs[2]) & (df.y == ys[9])]
    assert row.loss.item() == pytest.approx(expected[2, 9], rel=1e-12)


def test_quadratic_1d_slice_with_filter_normalised_direction():
    """A 1-D slice along random_directions(...)[0] equals the formula at every step."""
    model = Quadratic(seed=1)
    (d,) = random_directions(model, 1, seed=4)
    steps = np.linspace(-2, 2, 9)
    land = landscape_1d(model, mean_out, QDATA, steps=steps, seed=4, progress=False)
    w0, dv = model.w.detach().numpy(), d["w"].numpy()
    np.testing.assert_allclose(land.loss, [model.formula(w0 + s * dv) for s in steps], rtol=1e-12)
    assert land.settings["normalization"] == "filter" and land.settings["ignore"] == "biasbn"


def test_network_slice_matches_direct_evaluation_and_leaves_model_unchanged():
    """For a CNN with BatchNorm, loss/accuracy at two grid points equal a hand evaluation of a
    deep copy with the weights set; the model (weights, buffers, grads, flags) is bit-for-bit unchanged."""
    model = tiny_net()
    x, y = tiny_data()
    F.cross_entropy(model(x), y).backward()  # leave grads and train mode to be preserved
    snap = snapshot(model)
    dirs = random_directions(model, 2, seed=2)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    xs, ys = np.array([-0.5, 0.0, 0.25]), np.array([0.1, 0.7])
    land = landscape_2d(model, F.cross_entropy, batches, directions=dirs, x=xs, y=ys, progress=False)
    assert_unchanged(model, snap)
    for i, j in [(0, 1), (2, 0)]:
        ref = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.add_(xs[i] * dirs[0][name] + ys[j] * dirs[1][name])
            out = ref(x)
        assert land.loss[i, j] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
        assert land.accuracy[i, j] == pytest.approx((out.argmax(1) == y).float().mean().item())


def test_vmapped_points_equal_sequential_points():
    """points_per_call > 1 (torch.func.vmap over stacked weights) gives the sequential surface of a
    BatchNorm CNN, with a last call holding fewer points (7 x 3 grid, 4 per call)."""
    model = tiny_net()
    data = tiny_data()
    kwargs = dict(x=7, y=3, seed=3, metrics={"mean_logit": lambda o, t: o.mean()}, progress=False)
    seq = landscape_2d(model, F.cross_entropy, data, **kwargs)
    vec = landscape_2d(model, F.cross_entropy, data, points_per_call=4, **kwargs)
    np.testing.assert_allclose(vec.loss, seq.loss, rtol=1e-5)
    np.testing.assert_allclose(vec["mean_logit"], seq["mean_logit"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(vec.accuracy, seq.accuracy)
    with pytest.raises(UserInputError, match="bn='eval'"):
        landscape_1d(model, F.cross_entropy, data, steps=3, bn="recalibrate", points_per_call=2)


def test_same_seed_same_landscape():
    """Two runs with one seed agree exactly; another seed gives another surface."""
    model = tiny_net()
    data = tiny_data()
    a = landscape_2d(model, F.cross_entropy, data, x=3, y=4, seed=1, progress=False)
    b = landscape_2d(model, F.cross_entropy, data, x=3, y=4, seed=1, progress=False)
    c = landscape_2d(model, F.cross_entropy, data, x=3, y=4, seed=2, progress=False)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert not np.allclose(a.loss, c.loss)


def test_interpolation_endpoints_equal_the_two_models():
    """alpha = 0 and 1 give exactly the losses of model_a and model_b (BatchNorm buffers included)."""
    a, b = tiny_net(0), tiny_net(1)
    data = tiny_data()
    for m in (a, b):  # give the running statistics non-default values
        m.train()
        m(data[0])
        m.eval()
    snap = snapshot(a)
    land = interpolate(a, b, F.cross_entropy, data, alphas=[0.0, 0.5, 1.0], progress=False)
    assert_unchanged(a, snap)
    with torch.no_grad():
        la, lb = F.cross_entropy(a(data[0]), data[1]).item(), F.cross_entropy(b(data[0]), data[1]).item()
    assert land.loss[0] == la and land.loss[2] == lb
    assert land.dims == ("alpha",)


def test_recalibrate_matches_hand_written_bn_reestimation():
    """bn='recalibrate': at alpha = 0.5 the loss equals that of a copy whose weights are the mean of
    both models and whose BN statistics are re-estimated by hand (cumulative average over batches)."""
    a, b = tiny_net(0), tiny_net(1)
    x, y = tiny_data(30)
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    land = interpolate(a, b, F.cross_entropy, batches, alphas=[0.5], bn="recalibrate",
                       recalibration_batches=2, progress=False)
    ref = copy.deepcopy(a)
    with torch.no_grad():
        for (_, pr), (_, pb) in zip(ref.named_parameters(), b.named_parameters()):
            pr.copy_(0.5 * pr + 0.5 * pb)
    bn = ref[1]
    means = [ref[0](xb).mean(dim=(0, 2, 3)) for xb, _ in batches[:2]]
    vars_ = [ref[0](xb).var(dim=(0, 2, 3), unbiased=True) for xb, _ in batches[:2]]
    with torch.no_grad():
        bn.running_mean.copy_(sum(means) / 2)
        bn.running_var.copy_(sum(vars_) / 2)
        ref.eval()
        expected = F.cross_entropy(ref(x), y).item()
    assert land.loss[0] == pytest.approx(expected, rel=1e-5)
    eval_only = interpolate(a, b, F.cross_entropy, batches, alphas=[0.5], progress=False)
    assert eval_only.loss[0] != pytest.approx(expected, rel=1e-3)  # the policy changes the number


def test_user_metric_is_averaged_over_samples():
    """A user metric equals its sample-weighted mean over unequal batches, computed by hand."""
    model = tiny_net()
    x, y = tiny_data(25)
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]

    def max_logit(out, _t):
        return out.max(dim=1).values.mean()

    land = landscape_1d(model, F.cross_entropy, batches, steps=[0.0], metrics={"max_logit": max_logit},
                        progress=False)
    with torch.no_grad():
        model.eval()
        expected = model(x).max(dim=1).values.mean().item()
    assert land["max_logit"][0] == pytest.approx(expected, rel=1e-6)
    assert land.loss[0] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_save_load_round_trip(tmp_path):
    """The netCDF file gives back coordinates, values and settings exactly."""
    model = tiny_net()
    land = landscape_2d(model, F.cross_entropy, tiny_data(), x=3, y=[0.0, 0.5], progress=False)
    path = land.save(tmp_path / "land.nc")
    back = Landscape.load(path)
    np.testing.assert_array_equal(back.loss, land.loss)
    np.testing.assert_array_equal(back.coords["y"], [0.0, 0.5])
    assert back.settings == land.settings and back.complete


class _Interrupt(Exception):
    pass


def test_partial_grid_resumes_without_recomputing(tmp_path):
    """A run interrupted after some points is continued from its checkpoint file: only the missing
    points are evaluated (counted by the loss function) and the result equals an uninterrupted run."""
    model = Quadratic()
    path = tmp_path / "partial.nc"
    calls = {"n": 0, "limit": 9}

    def counting(out, t):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise _Interrupt
        return out.mean()

    kwargs = dict(x=np.linspace(-1, 1, 4), y=np.linspace(-1, 1, 5), seed=0, progress=False)
    with pytest.raises(_Interrupt):
        landscape_2d(model, counting, QDATA, checkpoint_path=path, checkpoint_every=4, **kwargs)
    saved = Landscape.load(path)
    assert saved.done.sum() == 8 and not saved.complete
    calls.update(n=0, limit=10**6)
    resumed = landscape_2d(model, counting, QDATA, checkpoint_path=path, checkpoint_every=4, **kwargs)
    assert calls["n"] == 1 + 20 - 8  # one loss call checks the model accepts the data, then the 12 missing points
    full = landscape_2d(model, mean_out, QDATA, **kwargs)
    np.testing.assert_array_equal(resumed.loss, full.loss)
    assert Landscape.load(path).complete


def test_resume_file_from_another_model_is_refused(tmp_path):
    """A checkpoint file computed for other weights is refused with a message naming the cause."""
    path = tmp_path / "land.nc"
    landscape_1d(Quadratic(0), mean_out, QDATA, steps=3, checkpoint_path=path, progress=False)
    with pytest.raises(UserInputError, match="another model"):
        landscape_1d(Quadratic(1), mean_out, QDATA, steps=3, checkpoint_path=path, progress=False)
    with pytest.raises(UserInputError, match="coordinates"):
        landscape_1d(Quadratic(0), mean_out, QDATA, steps=4, checkpoint_path=path, progress=False)


def test_nan_points_are_kept_and_reported():
    """Where the loss is NaN (sqrt of a negative weight) the value stays NaN, the others are right,
    and one warning gives the count."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)

    def sqrt_loss(out, _t):
        return torch.sqrt(model.weight.sum()) + 0 * out.mean()

    d = Direction({"weight": torch.ones(1, 1, dtype=torch.float64)})
    steps = np.array([-3.0, -2.0, 0.0, 3.0])
    with pytest.warns(RuntimeWarning, match="2 of 4 grid points"):
        land = landscape_1d(model, sqrt_loss, (torch.ones(2, 1, dtype=torch.float64), torch.zeros(2)),
                            direction=d, steps=steps, progress=False)
    assert np.isnan(land.loss[:2]).all()
    np.testing.assert_allclose(land.loss[2:], [1.0, 2.0])


def test_bad_input_is_refused_clearly():
    """Mismatched directions, empty or NaN coordinates, an unknown BN policy: one clear error each."""
    model = tiny_net()
    data = tiny_data()
    wrong_shape = Direction({"0.weight": torch.zeros(2, 2)})
    with pytest.raises(UserInputError, match="shape"):
        landscape_1d(model, F.cross_entropy, data, direction=wrong_shape, progress=False)
    with pytest.raises(UserInputError, match="does not have"):
        landscape_1d(model, F.cross_entropy, data, direction=random_directions(nn.Linear(2, 2), 1)[0],
                     progress=False)
    with pytest.raises(UserInputError, match="needs 2 direction"):
        landscape_2d(model, F.cross_entropy, data, directions=random_directions(model, 1), progress=False)
    with pytest.raises(UserInputError, match="non-empty"):
        landscape_2d(model, F.cross_entropy, data, x=[], progress=False)
    with pytest.raises(UserInputError, match="finite"):
        landscape_1d(model, F.cross_entropy, data, steps=[0.0, float("nan")], progress=False)
    with pytest.raises(UserInputError, match="bn must"):
        landscape_1d(model, F.cross_entropy, data, steps=3, bn="train", progress=False)
    with pytest.raises(UserInputError, match="same architecture"):
        interpolate(model, nn.Linear(2, 2), F.cross_entropy, data, progress=False)


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = Quadratic()
        land = landscape_2d(model, mean_out, QDATA, x=np.linspace(-1, 1, 3), y=np.linspace(0, 1, 5),
                            progress=False)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), land.loss)
    finally:
        torch.distributed.destroy_process_group()


def test_grid_points_shared_over_two_gloo_processes(tmp_path):
    """Two gloo ranks split the grid points and both end with the single-process surface."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = landscape_2d(Quadratic(), mean_out, QDATA, x=np.linspace(-1, 1, 3), y=np.linspace(0, 1, 5),
                          progress=False)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{r}.npy"), single.loss, rtol=1e-12)


def test_resume_with_another_loss_function_is_refused(tmp_path):
    """Issue 11: a partial grid made with CrossEntropyLoss() must not be continued with
    CrossEntropyLoss(label_smoothing=0.1) (repr() is the same for both, so the state must count),
    nor with another plain function or another metric; one line names the setting that differs.
    The same loss object type with the same settings resumes."""
    model, data = tiny_net(), tiny_data()
    path = tmp_path / "grid.nc"
    kwargs = dict(steps=[-0.5, 0.0], checkpoint_path=path, progress=False)
    landscape_1d(model, nn.CrossEntropyLoss(), data, **kwargs)
    with pytest.raises(UserInputError, match="another loss function.*loss_fn_identity") as err:
        landscape_1d(model, nn.CrossEntropyLoss(label_smoothing=0.1), data, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="another loss function"):
        landscape_1d(model, F.cross_entropy, data, **kwargs)
    with pytest.raises(UserInputError, match="metric"):
        landscape_1d(model, nn.CrossEntropyLoss(), data, metrics={"m": lambda o, t: o.mean()}, **kwargs)
    again = landscape_1d(model, nn.CrossEntropyLoss(), data, **kwargs)  # a new but equal loss object
    assert again.complete
    smooth = landscape_1d(model, nn.CrossEntropyLoss(label_smoothing=0.1), data, steps=[-0.5, 0.0], progress=False)
    assert not np.allclose(smooth.loss, again.loss)  # the two losses really give other values


def test_non_finite_weights_at_the_origin_are_refused_naming_the_tensor():
    """Issue 11: NaN/inf weights at w used to give an all-NaN grid with a warning; now every slice
    refuses them up front and names the tensor."""
    model, data = tiny_net(), tiny_data()
    dirs = random_directions(model, 2, seed=0)
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(UserInputError, match="4.weight"):
        landscape_1d(model, F.cross_entropy, data, direction=dirs[0], steps=3, progress=False)
    with pytest.raises(UserInputError, match="4.weight"):
        landscape_2d(model, F.cross_entropy, data, directions=dirs, x=2, y=2, progress=False)
    with pytest.raises(UserInputError, match="non-finite"):
        interpolate(model, tiny_net(1), F.cross_entropy, data, alphas=3, progress=False)
    with pytest.raises(UserInputError, match="model_b.*4.weight"):
        interpolate(tiny_net(1), model, F.cross_entropy, data, alphas=3, progress=False)


def test_model_that_cannot_run_on_the_data_is_one_line():
    """A CNN given flat vectors fails in one cheap forward pass before the grid, as a UserInputError
    (it used to be a RuntimeError traceback from inside the first grid point)."""
    data = (torch.randn(6, 10), torch.randint(0, 3, (6,)))
    with pytest.raises(UserInputError, match="cannot run on this data"):
        landscape_1d(tiny_net(), F.cross_entropy, data, steps=3, progress=False)
    with pytest.raises(UserInputError, match="cannot run on this data"):
        interpolate(tiny_net(0), tiny_net(1), F.cross_entropy, data, alphas=3, progress=False)


def test_grid_options_are_validated_in_one_line():
    """points_per_call, recalibration_batches and checkpoint_every go through the one validator."""
    model, data = Quadratic(), QDATA
    for bad in ({"points_per_call": 0}, {"points_per_call": 1.5}, {"recalibration_batches": 0},
                {"checkpoint_every": True}, {"steps": 0}):
        kwargs = {"steps": 3, **bad}
        with pytest.raises(UserInputError, match=next(iter(bad))):
            landscape_1d(model, mean_out, data, progress=False, **kwargs)
