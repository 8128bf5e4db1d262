"""Figures drawn from real results of a tiny model: sizes, files, values drawn, and no global state.

The inputs are produced by the real producers (``fit`` with SGD and ZSharp on synthetic images,
``hessian_*``, ``layer_curvature``, ``landscape_*``, ``interpolate``, ``ZSharp.mask_stats``) on an
MLP small enough for the whole module to run in a few seconds. What each test checks against is in
its docstring: hand computations in the test, torch's own quantile, or the result arrays themselves.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from sharpscope.analysis.hessian import hessian_density, hessian_eigenvalues, hessian_trace, layer_curvature
from sharpscope.analysis.landscape import interpolate, landscape_1d, landscape_2d
from sharpscope.data.synthetic import load_synthetic
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.optim.zscore import layer_zscores, zscore_mask
from sharpscope.plot import (
    OPTIMIZER_COLORS,
    optimizer_color,
    plot_alignment,
    plot_alignment_summary,
    plot_contour,
    plot_contours,
    plot_curvature_trajectories,
    plot_curvature_trajectory,
    plot_density,
    plot_interpolation,
    plot_interpolations,
    plot_landscape_1d,
    plot_landscape_1d_panels,
    plot_layer_curvature,
    plot_mask_heatmap,
    plot_mask_summary,
    plot_sharpness_summary,
    plot_surface,
    plot_training_curve,
    plot_training_curves,
    plot_zscore_distributions,
    save_figure,
    style,
)
from sharpscope.train.loop import fit

DPI = 100  # small PNGs keep the test fast; the default 300 dpi is checked once


def _data():
    train = load_synthetic(train=True, num_examples=96, num_classes=3, image_size=4, channels=1)
    test = load_synthetic(train=False, num_examples=48, num_classes=3, image_size=4, channels=1)
    return train, test


def _batch(split):
    x = (split.inputs.float() / 255.0 - 0.5).flatten(1)
    return x, split.targets


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real training runs (SGD, ZSharp) written to run folders by ``fit``."""
    torch.manual_seed(0)
    train, test = _data()
    out = {}
    for name in ("sgd", "zsharp"):
        model = build_model("mlp", 3, in_features=16, hidden=(12,))
        folder = tmp_path_factory.mktemp(name)
        result = fit(model, train, test, optimizer=name, epochs=3, batch_size=32, lr=0.1, device="cpu",
                     log_mask_every=1, augment=False, progress=False, out=folder)
        out[name] = (result.model.eval(), folder)
    return out


@pytest.fixture(scope="module")
def batch():
    """The whole synthetic training split as one flattened ``(x, y)`` batch."""
    return _batch(_data()[0])


@pytest.fixture(scope="module")
def curvature(runs, batch):
    """Real SLQ densities, top eigenvalues, traces and per-layer curvature of both models."""
    x, y = batch
    res = {}
    for name, (model, _) in runs.items():
        res[name] = {
            "density": hessian_density(model, F.cross_entropy, (x, y), n_iter=30, progress=False),
            "eigen": hessian_eigenvalues(model, F.cross_entropy, (x, y), k=3, progress=False),
            "trace": hessian_trace(model, F.cross_entropy, (x, y), n_samples=12, progress=False),
            "layers": layer_curvature(model, F.cross_entropy, (x, y), n_trace_samples=8, progress=False),
        }
    return res


@pytest.fixture(scope="module")
def landscapes(runs, batch):
    x, y = batch
    out = {}
    for name, (model, _) in runs.items():
        out[name] = {
            "1d": landscape_1d(model, F.cross_entropy, (x, y), steps=9, progress=False),
            "2d": landscape_2d(model, F.cross_entropy, (x, y), x=7, y=5, progress=False),
        }
    out["interp"] = interpolate(runs["sgd"][0], runs["zsharp"][0], F.cross_entropy, (x, y),
                                alphas=np.linspace(-0.2, 1.2, 8), progress=False)
    return out


@pytest.fixture(scope="module")
def zscores(runs, batch):
    """Per-layer Z-scores of the ZSharp model's gradient, with the filter's own threshold."""
    model = runs["zsharp"][0]
    x, y = batch
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    parts = []
    for name, p in model.named_parameters():
        if p.dim() > 1:
            parts.append(pd.DataFrame({"layer": name, "z": layer_zscores(p.grad).reshape(-1).numpy()}))
    model.zero_grad()
    return pd.concat(parts, ignore_index=True)


def _check_saved(fig: Figure, stem) -> None:
    paths = save_figure(fig, stem, dpi=DPI)
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    pdf, png = paths
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    w, h = fig.get_size_inches()
    with Image.open(png) as im:
        assert im.size == (round(w * DPI), round(h * DPI))
    plt.close(fig)


def _figure(out) -> Figure:
    return out if isinstance(out, Figure) else out.figure


# --- every plot function: returns Axes/Figure, writes both files at the expected size ----------------

CASES = {
    "training_curves": lambda r, c, ls, z: plot_training_curves({k: f for k, (_, f) in r.items()}),
    "training_curve": lambda r, c, ls, z: plot_training_curve({k: f for k, (_, f) in r.items()}, "acc"),
    "density": lambda r, c, ls, z: plot_density({k: v["density"] for k, v in c.items()},
                                               eigenvalues={k: v["eigen"] for k, v in c.items()}, top_k=3),
    "layer_curvature": lambda r, c, ls, z: plot_layer_curvature({k: v["layers"] for k, v in c.items()}),
    "trajectory": lambda r, c, ls, z: plot_curvature_trajectories(_trajectory(c), lr=0.1),
    "contour": lambda r, c, ls, z: plot_contour(ls["sgd"]["2d"]),
    "contour_filled": lambda r, c, ls, z: plot_contour(ls["sgd"]["2d"], filled=True),
    "contours": lambda r, c, ls, z: plot_contours({"sgd": ls["sgd"]["2d"], "zsharp": ls["zsharp"]["2d"]}),
    "surface": lambda r, c, ls, z: plot_surface(ls["zsharp"]["2d"], log=True),
    "landscape_1d": lambda r, c, ls, z: plot_landscape_1d({"sgd": ls["sgd"]["1d"], "zsharp": ls["zsharp"]["1d"]}),
    "landscape_1d_panels": lambda r, c, ls, z: plot_landscape_1d_panels({k: ls[k]["1d"] for k in ("sgd", "zsharp")}),
    "interpolation": lambda r, c, ls, z: plot_interpolation(ls["interp"], endpoints=("SGD", "ZSharp")),
    "interpolations": lambda r, c, ls, z: plot_interpolations({"a": ls["interp"], "b": ls["interp"]}),
    "alignment_summary": lambda r, c, ls, z: plot_alignment_summary(
        {k: pd.DataFrame({"method": ["sam", "zsharp", "random"], "cos_subspace": [0.4, 0.6, 0.1],
                          "loss_increase": [2e-4, 3e-4, 1e-5]}) for k in ("sgd", "zsharp")}, k=3, rho=0.05),
    "zscores_grid": lambda r, c, ls, z: plot_zscore_distributions(z),
    "zscores_ridge": lambda r, c, ls, z: plot_zscore_distributions(z, kind="ridge"),
    "mask_summary": lambda r, c, ls, z: plot_mask_summary(r["zsharp"][1] / "masks.csv", percentile=0.95),
    "mask_heatmap": lambda r, c, ls, z: plot_mask_heatmap(r["zsharp"][1]),
    "alignment": lambda r, c, ls, z: plot_alignment(
        {k: v["layers"][["layer", "top_eigenvalue"]] for k, v in c.items()}, "top_eigenvalue"),
}


def _trajectory(curv) -> pd.DataFrame:
    # Two "checkpoints" per optimizer are the two trained models' real numbers at epochs 0 and 3
    # (a curvature table across checkpoints has exactly this shape).
    rows = []
    for name, v in curv.items():
        for epoch in (0, 3):
            rows.append({"optimizer": name, "epoch": epoch, "lambda_max": float(v["eigen"].eigenvalues[0]),
                         "trace": v["trace"].estimate, "trace_stderr": v["trace"].stderr})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("venue,column", [("icml", "single"), ("neurips", "single")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_plot_writes_files_of_the_style_width(case, venue, column, runs, curvature, landscapes, zscores,
                                                    tmp_path):
    """Each function returns Axes/Figure, the figure is the venue's column width (VENUES table),
    and save_figure writes a real PDF and a PNG of exactly width x height x dpi pixels."""
    with style(venue, column) as params:
        out = CASES[case](runs, curvature, landscapes, zscores)
        assert isinstance(out, (Axes, Figure))
        fig = _figure(out)
        assert fig.get_size_inches()[0] == pytest.approx(params["figure.figsize"][0]) or case in (
            "contour", "contour_filled", "surface")  # square panels: half the text width on wide venues
        _check_saved(fig, tmp_path / case)


def test_widths_match_venue_text_blocks():
    """Figure widths are the published text-block widths: NeurIPS/ICLR 5.5 in, ICML 3.25/6.75 in."""
    expected = {("neurips", "single"): 5.5, ("iclr", "single"): 5.5, ("icml", "single"): 3.25,
                ("icml", "double"): 6.75}
    for (venue, column), width in expected.items():
        with style(venue, column):
            assert mpl.rcParams["figure.figsize"][0] == width


def test_no_global_state_changed(runs, curvature, landscapes, zscores):
    """rcParams are identical before and after a plot call and after a ``with style()`` block."""
    before = dict(mpl.rcParams)
    for make in CASES.values():
        plt.close(_figure(make(runs, curvature, landscapes, zscores)))
    assert dict(mpl.rcParams) == before
    with style("icml", "double"):
        assert mpl.rcParams["font.family"] == ["serif"]
    assert dict(mpl.rcParams) == before


def test_default_dpi_is_print_quality(curvature, tmp_path):
    """Without dpi, PNGs are 300 dpi: pixel width = 300 x the figure width in inches."""
    with style("icml"):
        ax = plot_density(curvature["sgd"]["density"])
    _, png = save_figure(ax.figure, tmp_path / "d")
    with Image.open(png) as im:
        assert im.size[0] == round(3.25 * 300)
    plt.close(ax.figure)


# --- the values drawn are the results' values ------------------------------------------------------

def test_density_draws_the_result_arrays(curvature):
    """The curve is DensityResult.grid/.density; the markers sit at EigenResult.eigenvalues[:k]."""
    dens, eig = curvature["sgd"]["density"], curvature["sgd"]["eigen"]
    ax = plot_density(dens, eigenvalues=eig, top_k=2)
    curve, marks = ax.lines[0], ax.lines[1]
    np.testing.assert_array_equal(curve.get_xdata(), dens.grid)
    np.testing.assert_allclose(curve.get_ydata(), np.where(dens.density > 0, dens.density, np.nan))
    np.testing.assert_allclose(marks.get_xdata(), np.sort(eig.eigenvalues)[::-1][:2])
    assert ax.get_yscale() == "log"
    plt.close(ax.figure)


def test_contour_orientation_on_a_non_square_grid(landscapes):
    """On a 7 x 5 grid, loss[i, j] belongs at (x[i], y[j]): the contour's data limits are the x
    and y ranges, and levels span min..max of the loss (log-spaced by default for a wide range)."""
    land = landscapes["sgd"]["2d"]
    ax = plot_contour(land, log=False, levels=5)
    cs = [c for c in ax.collections if hasattr(c, "levels")][0]
    np.testing.assert_allclose(cs.levels[[0, -1]], [land.loss.min(), land.loss.max()])
    x0, x1 = ax.dataLim.intervalx
    y0, y1 = ax.dataLim.intervaly
    assert (x0, x1) == pytest.approx((land.coords["x"].min(), land.coords["x"].max()))
    assert (y0, y1) == pytest.approx((land.coords["y"].min(), land.coords["y"].max()))
    plt.close(ax.figure)


def test_landscape_1d_accuracy_in_percent_and_undone_points_skipped(landscapes):
    """Accuracy fractions are drawn x100; points with done=False are left out of the curve."""
    df = landscapes["sgd"]["1d"].to_dataframe()
    df.loc[0, "done"] = False
    ax = plot_landscape_1d(df, "accuracy")
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_ydata(), df["accuracy"].to_numpy()[1:] * 100)
    plt.close(ax.figure)


def test_training_curves_read_metrics_jsonl(runs):
    """Test-loss curve of each optimizer equals the test_loss column of its metrics.jsonl, in the
    optimizer's palette colour (SGD black, ZSharp vermillion)."""
    paths = {k: f / "metrics.jsonl" for k, (_, f) in runs.items()}
    ax = plot_training_curve(paths, "loss", splits=("test",))
    for line, name in zip(ax.lines, paths):
        expected = pd.read_json(paths[name], lines=True)["test_loss"].to_numpy()
        np.testing.assert_allclose(line.get_ydata(), expected)
        assert line.get_color() == OPTIMIZER_COLORS[name]
    plt.close(ax.figure)


def test_zscore_threshold_is_torch_quantile(zscores):
    """The dotted +-tau lines sit at ZSharp's own threshold, zscore_mask(g).threshold, which uses
    torch's selection quantile; the plot computes it independently with numpy."""
    layer = zscores["layer"].iloc[0]
    z = torch.tensor(zscores.loc[zscores["layer"] == layer, "z"].to_numpy())
    tau = float(torch.quantile(z.abs(), 0.95))
    fig = plot_zscore_distributions(zscores, layers=[layer], percentile=0.95)
    ax = fig.axes[0]
    vlines = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":")
    assert vlines == pytest.approx([-tau, tau], rel=1e-6)
    g = torch.randn(300, dtype=torch.float64)
    assert float(zscore_mask(g, 0.95).threshold) == pytest.approx(
        float(np.quantile(np.abs(layer_zscores(g).numpy()), 0.95)), rel=1e-12)
    plt.close(fig)


def test_mask_summary_shares_match_hand_computation(runs):
    """Right panel: SAM's bars are 100 ||g_l||^2 / sum ||g||^2 and ZSharp's share 100 ||e_l||^2 / sum ||e||^2,
    computed per logged step and averaged, by hand here; ZSharp scales every tensor's perturbation to
    norm rho, so its share is 100 / L for each of the L layers: one line "by construction", not bars."""
    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    fig = plot_mask_summary(log)
    bars = {c.get_label(): [b.get_width() for b in c] for c in fig.axes[1].containers}
    shares = {}
    for col in ("perturbation_norm", "grad_norm"):
        sq = log[col] ** 2
        shares[col] = (sq / sq.groupby(log["step"]).transform("sum")).groupby(log["layer"], sort=False).mean() * 100
    np.testing.assert_allclose(bars["SAM (gradient share)"], shares["grad_norm"].to_numpy())
    assert "ZSharp" not in bars
    np.testing.assert_allclose(shares["perturbation_norm"], 100 / log["layer"].nunique())
    line = [ln for ln in fig.axes[1].lines if "by construction" in ln.get_label()][0]
    assert line.get_xdata()[0] == pytest.approx(100 / log["layer"].nunique())
    kept = [b.get_width() for b in fig.axes[0].containers[0]]
    np.testing.assert_allclose(kept, log.groupby("layer", sort=False)["kept_fraction"].mean().to_numpy() * 100)
    plt.close(fig)


def test_mask_heatmap_cells_are_the_log(runs):
    """Cell (layer l, step s) holds kept_fraction x 100 of that row of masks.csv."""
    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    ax = plot_mask_heatmap(log)
    cells = np.asarray(ax.collections[0].get_array()).reshape(log["layer"].nunique(), -1)
    expected = log.pivot_table(index="layer", columns="step", values="kept_fraction", sort=False).to_numpy()
    np.testing.assert_allclose(cells, expected * 100)
    plt.close(ax.figure)


def test_optimizer_colours_fixed_and_distinct():
    """One fixed colour per optimizer, all different; spellings map to the same colour."""
    assert len(set(OPTIMIZER_COLORS.values())) == len(OPTIMIZER_COLORS) == 7
    assert optimizer_color("Friendly-SAM") == optimizer_color("fsam")
    assert optimizer_color("ZSharp (p=0.9)") == OPTIMIZER_COLORS["zsharp"]


# --- bad input: one clear line ----------------------------------------------------------------------

def test_bad_inputs_raise_user_errors(landscapes, tmp_path):
    """Unknown venue/column/format, missing columns and NaNs raise UserInputError naming the argument."""
    with pytest.raises(UserInputError, match="venue"):
        with style("nature"):
            pass
    with pytest.raises(UserInputError, match="column"):
        with style("icml", "triple"):
            pass
    fig, _ = plt.subplots()
    with pytest.raises(UserInputError, match="formats"):
        save_figure(fig, tmp_path / "x", formats=("jpg",))
    assert not list(tmp_path.iterdir())
    plt.close(fig)
    with pytest.raises(UserInputError, match="missing column"):
        plot_curvature_trajectory(pd.DataFrame({"epoch": [0, 1]}))
    with pytest.raises(UserInputError, match="non-finite"):
        plot_curvature_trajectory(pd.DataFrame({"epoch": [0, 1], "lambda_max": [1.0, np.nan]}))
    with pytest.raises(UserInputError, match="3-D"):
        plot_surface(landscapes["sgd"]["2d"], ax=plt.subplots()[1])
    with pytest.raises(UserInputError, match="history file not found"):
        plot_training_curves({"sgd": tmp_path / "missing"})
    with pytest.raises(UserInputError, match="kind"):
        plot_zscore_distributions(pd.DataFrame({"layer": ["a"] * 5, "z": np.arange(5.0)}), kind="violin")
    plt.close("all")


def test_zscore_distributions_from_a_zscore_result(runs, batch):
    """A ZScoreResult is drawn as its stored histogram: on one full-data batch the steps equal a numpy
    histogram (density) of layer_zscores of the gradient computed here by hand, and the dotted lines sit
    at ZSharp's own threshold zscore_mask(g, 0.95).threshold."""
    from sharpscope.analysis.gradients import gradient_zscores

    model = runs["zsharp"][0]
    x, y = batch
    result = gradient_zscores(model, F.cross_entropy, (x, y), bins=40, z_range=(-4.0, 4.0), progress=False)
    layer = result.layers[0]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = dict(model.named_parameters())[layer].grad.detach().double()
    model.zero_grad()
    z = layer_zscores(g).reshape(-1).numpy()
    counts, edges = np.histogram(z, bins=np.linspace(-4.0, 4.0, 41))
    expected = counts / (z.size * np.diff(edges))
    fig = plot_zscore_distributions(result, layers=[layer])
    ax = fig.axes[0]
    steps = [p for p in ax.patches if hasattr(p, "get_data")]
    np.testing.assert_allclose(steps[0].get_data().values, expected, rtol=1e-12)
    tau = float(zscore_mask(g, 0.95).threshold)
    vlines = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":")
    assert vlines == pytest.approx([-tau, tau], rel=1e-6)
    plt.close(fig)


def test_sharpness_summary_bars_are_the_table():
    """One panel per quantity; bar heights are the table's values, error bars its *_stderr column, each
    bar in its optimizer's fixed colour; absent quantities are skipped."""
    from matplotlib.colors import to_hex

    from sharpscope.plot import plot_sharpness_summary

    table = pd.DataFrame({"run": ["sgd", "sam", "zsharp"], "lambda_max": [1.4, 0.7, 0.6],
                          "trace": [10.0, 5.5, 5.0], "trace_stderr": [0.1, 0.05, 0.04]})
    fig = plot_sharpness_summary(table)
    assert len(fig.axes) == 2
    from matplotlib.container import BarContainer

    for ax, column in zip(fig.axes, ("lambda_max", "trace")):
        bars = next(c for c in ax.containers if isinstance(c, BarContainer))
        np.testing.assert_allclose([b.get_height() for b in bars], table[column])
        assert [to_hex(b.get_facecolor()) for b in bars] == [OPTIMIZER_COLORS[n].lower() for n in table["run"]]
    errors = next(c for c in fig.axes[1].containers if isinstance(c, BarContainer)).errorbar
    assert errors is not None
    segments = errors.lines[2][0].get_segments()
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 2 * table["trace_stderr"])
    with pytest.raises(UserInputError, match="none of the columns"):
        plot_sharpness_summary(table[["run"]])
    plt.close(fig)


def test_style_keeps_interactive_mode_switched_on_inside_it():
    """Checks against matplotlib's own flag: Jupyter turns interactive mode on at the first draw
    inside ``style()``; leaving the block must not turn it off again (later figures would vanish)."""
    import matplotlib as mpl

    from sharpscope.plot import style

    before = mpl.rcParams["interactive"]
    try:
        mpl.rcParams["interactive"] = False
        with style("neurips"):
            mpl.rcParams["interactive"] = True
        assert mpl.rcParams["interactive"] is True
    finally:
        mpl.rcParams["interactive"] = before


# --- every demo figure is a public function; data under one name; kwargs reach matplotlib ----------

def _with_ends(line, a: str, b: str):
    """A shallow copy of an interpolation whose settings name its end points, as ``analyze`` stores them."""
    import copy

    out = copy.copy(line)
    out.settings = {**line.settings, "model_a": {"optimizer": a}, "model_b": {"optimizer": b}}
    return out


def test_interpolations_figure_draws_each_pair_from_its_result(landscapes):
    """One row per pair, loss then accuracy: each line's y data is the result's loss / 100 x accuracy
    (sorted by alpha); the end points are named from the stored settings (optimizer labels); an accuracy
    axis spans at least MIN_ACCURACY_SPAN points; the given ``fig`` is the one drawn on."""
    from sharpscope.plot import plot_interpolations
    from sharpscope.plot.landscape import MIN_ACCURACY_SPAN

    line = landscapes["interp"]
    pairs = {"sgd--zsharp": _with_ends(line, "sgd", "zsharp"), "sam--zsharp": _with_ends(line, "sam", "zsharp")}
    given = plt.figure()
    fig = plot_interpolations(pairs, fig=given)
    assert fig is given and len([ax for ax in fig.axes if ax.lines]) == 4
    df = line.to_dataframe().sort_values("alpha")
    loss_ax, acc_ax = [ax for ax in fig.axes if ax.lines][:2]
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), df["loss"])
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), df["accuracy"] * 100)
    lo, hi = acc_ax.get_ylim()
    assert hi - lo >= MIN_ACCURACY_SPAN - 1e-9
    tops = [t.get_text() for t in loss_ax.child_axes[0].get_xticklabels()]
    assert tops == ["SGD", "ZSharp"]
    assert loss_ax.get_ylabel() == "Loss" and acc_ax.get_ylabel() == "Accuracy (%)"
    plt.close(fig)


def test_interpolation_endpoints_from_settings_or_a_b(landscapes):
    """Names come from model_a/model_b (optimizer labels), then run and epoch when the optimizers agree,
    and A/B when nothing is stored (the fixture's bare interpolate result)."""
    from sharpscope.plot import interpolation_endpoints

    line = landscapes["interp"]
    assert interpolation_endpoints(line) == ("A", "B")
    assert interpolation_endpoints(_with_ends(line, "sam", "zsharp")) == ("SAM", "ZSharp")
    same = _with_ends(line, "sgd", "sgd")
    same.settings["model_a"].update(run="r1", epoch=3)
    same.settings["model_b"].update(run="r2", epoch=5)
    assert interpolation_endpoints(same) == ("SGD (r1, ep. 3)", "SGD (r2, ep. 5)")


def test_surface_title_log_values_and_given_axes(landscapes):
    """plot_surface(log=True, title=...) draws on the given 3-D Axes, titles it, and its z range is
    log10 of the landscape's loss range (the demo's surface_<run> figure)."""
    land = landscapes["sgd"]["2d"]
    fig = plt.figure()
    ax3d = fig.add_subplot(projection="3d")
    out = plot_surface(land, log=True, title="SGD", ax=ax3d)
    assert out is ax3d and out.get_title() == "SGD"
    lo, hi = out.get_zlim()
    assert lo <= np.log10(land.loss.min()) + 1e-9 and hi >= np.log10(land.loss.max()) - 1e-9
    plt.close(fig)


@pytest.fixture(scope="module")
def alignment(runs, batch):
    """A real perturbation_alignment result of the ZSharp model (k = 2, rho = 0.05)."""
    from sharpscope.analysis.masks import perturbation_alignment

    x, y = batch
    return perturbation_alignment(runs["zsharp"][0], F.cross_entropy, (x, y), k=2, rho=0.05, progress=False)


def test_alignment_summary_bars_are_the_result(alignment):
    """Left panel: one bar per ascent rule of width cos_subspace; right: loss_increase, shown in units of
    the power of ten named in the label; k and rho in the labels come from the result's settings."""
    from sharpscope.plot import plot_alignment_summary

    table = alignment.to_dataframe()
    fig = plot_alignment_summary(alignment)
    left, right = fig.axes[:2]
    np.testing.assert_allclose([b.get_width() for b in left.containers[0]], table["cos_subspace"])
    label = right.get_xlabel()
    exponent = int(label.split("10^{")[1].split("}")[0]) if "10^{" in label else 0
    np.testing.assert_allclose([b.get_width() for b in right.containers[0]],
                               table["loss_increase"] / 10.0**exponent, rtol=1e-12)
    assert "top-2" in left.get_xlabel() and "0.05" in label
    names = [t.get_text() for t in left.get_yticklabels()]
    assert "SAM" in names and "ZSharp" in names
    plt.close(fig)


def test_alignment_summary_compares_models_in_given_order():
    """A mapping {model: table} gives one bar per model and rule, in the mapping's order, with a legend;
    explicit k and rho label a bare table."""
    from sharpscope.plot import plot_alignment_summary

    def table(scale):
        return pd.DataFrame({"method": ["sam", "zsharp", "random"], "cos_subspace": [0.5, 0.7, 0.1],
                             "loss_increase": np.array([1.0, 2.0, 0.5]) * scale})

    fig = plot_alignment_summary({"sgd": table(1.0), "zsharp": table(2.0)}, k=3, rho=0.1)
    right = fig.axes[1]
    widths = [[b.get_width() for b in c] for c in right.containers]
    np.testing.assert_allclose(widths, [[1.0, 2.0, 0.5], [2.0, 4.0, 1.0]])
    assert "top-3" in fig.axes[0].get_xlabel() and "0.1" in right.get_xlabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["SGD", "ZSharp"]
    plt.close(fig)


SINGLE_AXES = {
    "contour": lambda r, c, ls, z, ax: plot_contour(ls["sgd"]["2d"], ax=ax),
    "landscape_1d": lambda r, c, ls, z, ax: plot_landscape_1d(ls["sgd"]["1d"], ax=ax),
    "interpolation": lambda r, c, ls, z, ax: plot_interpolation(ls["interp"], ax=ax),
    "density": lambda r, c, ls, z, ax: plot_density(c["sgd"]["density"], ax=ax),
    "trajectory": lambda r, c, ls, z, ax: plot_curvature_trajectory(_trajectory(c), ax=ax),
    "layer_curvature": lambda r, c, ls, z, ax: plot_layer_curvature(c["sgd"]["layers"], ax=ax),
    "training_curve": lambda r, c, ls, z, ax: plot_training_curve({"sgd": r["sgd"][1]}, ax=ax),
    "mask_heatmap": lambda r, c, ls, z, ax: plot_mask_heatmap(r["zsharp"][1], ax=ax),
    "alignment": lambda r, c, ls, z, ax: plot_alignment(c["sgd"]["layers"], "top_eigenvalue", ax=ax),
}


@pytest.mark.parametrize("case", sorted(SINGLE_AXES))
def test_single_panel_functions_draw_on_the_given_axes(case, runs, curvature, landscapes, zscores):
    """With ``ax=``, the function returns that very Axes and draws its data there (no new figure)."""
    fig, ax = plt.subplots()
    before = plt.get_fignums()
    out = SINGLE_AXES[case](runs, curvature, landscapes, zscores, ax)
    assert out is ax and plt.get_fignums() == before
    assert ax.lines or ax.collections or ax.patches
    plt.close(fig)


ALPHA = 0.37  # a value no default style uses, so finding it proves the keyword reached an artist
WITH_KWARGS = {
    "contour": lambda r, c, ls, z, **kw: plot_contour(ls["sgd"]["2d"], **kw),
    "contour_filled": lambda r, c, ls, z, **kw: plot_contour(ls["sgd"]["2d"], filled=True, **kw),
    "contours": lambda r, c, ls, z, **kw: plot_contours({k: ls[k]["2d"] for k in ("sgd", "zsharp")}, **kw),
    "surface": lambda r, c, ls, z, **kw: plot_surface(ls["sgd"]["2d"], **kw),
    "landscape_1d": lambda r, c, ls, z, **kw: plot_landscape_1d(ls["sgd"]["1d"], **kw),
    "landscape_1d_panels": lambda r, c, ls, z, **kw: plot_landscape_1d_panels(ls["sgd"]["1d"], **kw),
    "interpolation": lambda r, c, ls, z, **kw: plot_interpolation(ls["interp"], **kw),
    "interpolations": lambda r, c, ls, z, **kw: plot_interpolations({"a": ls["interp"]}, **kw),
    "density": lambda r, c, ls, z, **kw: plot_density(c["sgd"]["density"], **kw),
    "trajectory": lambda r, c, ls, z, **kw: plot_curvature_trajectory(_trajectory(c), **kw),
    "trajectories": lambda r, c, ls, z, **kw: plot_curvature_trajectories(_trajectory(c), **kw),
    "layer_curvature": lambda r, c, ls, z, **kw: plot_layer_curvature(c["sgd"]["layers"], **kw),
    "sharpness_summary": lambda r, c, ls, z, **kw: plot_sharpness_summary(
        pd.DataFrame({"run": ["sgd", "zsharp"], "trace": [2.0, 1.0]}), **kw),
    "training_curve": lambda r, c, ls, z, **kw: plot_training_curve({"sgd": r["sgd"][1]}, **kw),
    "training_curves": lambda r, c, ls, z, **kw: plot_training_curves({"sgd": r["sgd"][1]}, **kw),
    "mask_heatmap": lambda r, c, ls, z, **kw: plot_mask_heatmap(r["zsharp"][1], **kw),
    "mask_summary": lambda r, c, ls, z, **kw: plot_mask_summary(r["zsharp"][1], **kw),
    "alignment": lambda r, c, ls, z, **kw: plot_alignment(c["sgd"]["layers"], "top_eigenvalue", **kw),
    "alignment_summary": lambda r, c, ls, z, **kw: plot_alignment_summary(
        pd.DataFrame({"method": ["sam", "zsharp"], "cos_subspace": [0.3, 0.6], "loss_increase": [1.0, 2.0]}),
        **kw),
    "zscores_grid": lambda r, c, ls, z, **kw: plot_zscore_distributions(z, **kw),
    "zscores_ridge": lambda r, c, ls, z, **kw: plot_zscore_distributions(z, kind="ridge", **kw),
}


@pytest.mark.parametrize("case", sorted(WITH_KWARGS))
def test_keyword_arguments_reach_the_matplotlib_artists(case, runs, curvature, landscapes, zscores):
    """``alpha=0.37`` passed to a plot function is found on more of the drawn artists than in the same
    call without it (so it reached the artists that draw the data, not only an unrelated one)."""
    def count(out):
        fig = _figure(out)
        found = fig.findobj(match=lambda a: hasattr(a, "get_alpha") and a.get_alpha() == ALPHA)
        plt.close(fig)
        return len(found)

    make = WITH_KWARGS[case]
    assert count(make(runs, curvature, landscapes, zscores, alpha=ALPHA)) > count(
        make(runs, curvature, landscapes, zscores))


def test_line_and_bar_keywords_override_the_defaults(landscapes, curvature, runs):
    """Named matplotlib properties win over the palette and the default widths: linewidth and color of
    the curves, color of the layer-curvature dots."""
    from matplotlib.colors import to_hex

    ax = plot_landscape_1d({"sgd": landscapes["sgd"]["1d"], "zsharp": landscapes["zsharp"]["1d"]},
                           linewidth=2.75, color="#123456")
    assert [ln.get_linewidth() for ln in ax.lines] == [2.75, 2.75]
    assert {to_hex(ln.get_color()) for ln in ax.lines} == {"#123456"}
    plt.close(ax.figure)
    ax = plot_training_curve({k: f for k, (_, f) in runs.items()}, "loss", linewidth=2.25)
    assert ax.lines and all(ln.get_linewidth() == 2.25 for ln in ax.lines)
    plt.close(ax.figure)
    ax = plot_layer_curvature(curvature["sgd"]["layers"], color="#654321")
    assert ax.lines and {to_hex(ln.get_color()) for ln in ax.lines} == {"#654321"}
    plt.close(ax.figure)


DEPRECATED = [
    ("plot_contour", "landscape", lambda ls, c: ls["sgd"]["2d"]),
    ("plot_contours", "landscapes", lambda ls, c: {"sgd": ls["sgd"]["2d"]}),
    ("plot_surface", "landscape", lambda ls, c: ls["sgd"]["2d"]),
    ("plot_landscape_1d", "landscapes", lambda ls, c: ls["sgd"]["1d"]),
    ("plot_landscape_1d_panels", "landscapes", lambda ls, c: ls["sgd"]["1d"]),
    ("plot_interpolation", "landscapes", lambda ls, c: ls["interp"]),
    ("plot_density", "density", lambda ls, c: c["sgd"]["density"]),
    ("plot_sharpness_summary", "table", lambda ls, c: pd.DataFrame({"run": ["sgd"], "trace": [1.0]})),
    ("plot_alignment", "table", lambda ls, c: c["sgd"]["layers"][["layer", "top_eigenvalue"]]),
]


@pytest.mark.parametrize("name,old,make", DEPRECATED, ids=[d[0] for d in DEPRECATED])
def test_former_data_keyword_still_works_and_warns(name, old, make, landscapes, curvature):
    """The data's former keyword name (a public contract) still draws, with a DeprecationWarning; the new
    name ``data=`` gives the same plot without one; both at once is a TypeError."""
    import warnings

    import sharpscope.plot as ssplot

    func = getattr(ssplot, name)
    value = make(landscapes, curvature)
    with pytest.warns(DeprecationWarning, match=f"{old}="):
        old_out = func(**{old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new_out = func(data=value)
    assert type(old_out) is type(new_out)
    old_fig, new_fig = _figure(old_out), _figure(new_out)
    assert len(old_fig.findobj()) == len(new_fig.findobj())  # the same drawing
    with pytest.raises(TypeError, match="twice"):
        func(value, **{old: value})
    plt.close("all")


def test_training_and_mask_former_keywords(runs):
    """histories=, stats= and log= (the former names) still work for the training and mask figures."""
    folder = runs["zsharp"][1]
    with pytest.warns(DeprecationWarning):
        plot_training_curves(histories={"zsharp": folder})
    with pytest.warns(DeprecationWarning):
        plot_training_curve(histories={"zsharp": folder})
    with pytest.warns(DeprecationWarning):
        plot_mask_summary(stats=folder)
    with pytest.warns(DeprecationWarning):
        plot_mask_heatmap(log=folder)
    plt.close("all")


def test_readers_are_the_library_readers(runs):
    """plot.read_history / plot.read_mask_log return what sharpscope.train.metrics.read_metrics and
    sharpscope.analysis.masks.load_mask_log return for the same run folder."""
    from sharpscope.analysis.masks import load_mask_log
    from sharpscope.plot import read_history, read_mask_log
    from sharpscope.train.metrics import read_metrics

    folder = runs["zsharp"][1]
    pd.testing.assert_frame_equal(read_history(folder), read_metrics(folder))
    pd.testing.assert_frame_equal(read_mask_log(folder), load_mask_log(folder))


def test_rule_kept_fraction_is_what_the_filter_keeps():
    """The kept fraction of the rule equals what ZSharp's own filter keeps of n distinct values (counted
    on random tensors), e.g. 2 of 22 and 11 of 216 at p = 0.95 -- not 5 %."""
    from sharpscope.plot import rule_kept_fraction

    gen = torch.Generator().manual_seed(0)
    sizes = [22, 216, 640, 4096]
    for p in (0.9, 0.95):
        counted = [float(zscore_mask(torch.randn(n, generator=gen), p).kept) / n for n in sizes]
        np.testing.assert_allclose(rule_kept_fraction(sizes, p), counted)
    np.testing.assert_allclose(rule_kept_fraction([22, 216], 0.95), [2 / 22, 11 / 216])


def test_mask_summary_marks_the_rule_per_layer(runs):
    """With ``percentile``, each layer's row carries a mark at 100 x rule_kept_fraction(numel, p), the
    count of its own size (the log's numel column), not one line at 1 - p."""
    from sharpscope.plot import rule_kept_fraction

    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    fig = plot_mask_summary(log, percentile=0.95)
    marks = [ln for ln in fig.axes[0].lines if ln.get_marker() == "|"]
    assert len(marks) == 1
    numel = log.groupby("layer", sort=False)["numel"].first().to_numpy()
    np.testing.assert_allclose(marks[0].get_xdata(), 100 * rule_kept_fraction(numel, 0.95))
    assert "lfloor" in marks[0].get_label()
    plt.close(fig)


def test_mask_summary_reads_per_batch_statistics(runs):
    """A per-batch table (``batch`` instead of ``step``, as mask_statistics(per_batch=True) writes) gives
    the same bars as the step-indexed log it was renamed from."""
    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    by_step = plot_mask_summary(log)
    by_batch = plot_mask_summary(log.drop(columns=["epoch"], errors="ignore").rename(columns={"step": "batch"}))
    for a, b in zip(by_step.axes, by_batch.axes):
        assert [[r.get_width() for r in c] for c in a.containers] == [[r.get_width() for r in c]
                                                                       for c in b.containers]
    plt.close("all")


def test_optimizer_rank_follows_the_one_display_order():
    """Sorting by optimizer_rank reproduces sharpscope.optim.OPTIMIZER_ORDER (any spelling), unknown last."""
    from sharpscope.optim import OPTIMIZER_ORDER
    from sharpscope.plot import optimizer_rank

    names = ["my_run", "ZSharp", "Friendly-SAM", "asam", "SAM", "adamw", "Adam", "SGD"]
    ranked = sorted(names, key=optimizer_rank)
    assert ranked[:-1] == ["SGD", "Adam", "adamw", "SAM", "asam", "Friendly-SAM", "ZSharp"]
    assert [optimizer_rank(n) for n in OPTIMIZER_ORDER] == list(range(len(OPTIMIZER_ORDER)))
    assert ranked[-1] == "my_run"


class _TableLike:
    """A result that is one table (the shape of layer_curvature / mask_statistics results): only
    ``to_dataframe()`` and ``settings``, no DataFrame methods."""

    def __init__(self, table: pd.DataFrame) -> None:
        self._table = table
        self.settings = {}

    def to_dataframe(self) -> pd.DataFrame:
        return self._table.copy()


def test_table_results_are_drawn_like_their_tables(curvature, runs):
    """A table result (anything with .to_dataframe()) gives the same dots/bars as its DataFrame, for
    the per-layer curvature and the mask summary."""
    layers = curvature["sgd"]["layers"]
    frame = layers.to_dataframe() if hasattr(layers, "to_dataframe") else layers
    a, b = plot_layer_curvature(_TableLike(frame)), plot_layer_curvature(frame)
    assert list(a.lines[0].get_xdata()) == list(b.lines[0].get_xdata())
    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    fa, fb = plot_mask_summary(_TableLike(log)), plot_mask_summary(log)
    assert [r.get_width() for r in fa.axes[0].containers[0]] == [r.get_width() for r in fb.axes[0].containers[0]]
    plt.close("all")


def test_long_run_names_keep_the_figure_usable(curvature, tmp_path):
    """Eight runs named by whole paths: the density legend fits inside the figure (its drawn extent,
    measured by matplotlib) and saving raises no 'axes collapsed' warning; labels keep their ends.
    The sharpness bars of the same runs likewise save without that warning."""
    import warnings

    names = [f"tmp_pytest-of-root_pytest-61_test_curvature_trajectory_over0_run{i}_epoch_000{i}" for i in range(8)]
    with style("icml"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ax = plot_density({n: curvature["sgd"]["density"] for n in names})
        fig = ax.figure
        fig.canvas.draw()
        legend = ax.get_legend()
        assert legend.get_window_extent().width <= fig.bbox.width
        assert all(t.get_text().endswith(n[-10:]) for t, n in zip(legend.get_texts(), names))
        save_figure(fig, tmp_path / "density", dpi=DPI)
        table = pd.DataFrame({"run": names, "lambda_max": np.arange(1.0, 9.0), "trace": np.arange(2.0, 10.0)})
        save_figure(plot_sharpness_summary(table), tmp_path / "summary", dpi=DPI)
    plt.close("all")
