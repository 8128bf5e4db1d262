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
    plot_contour,
    plot_contours,
    plot_curvature_trajectories,
    plot_curvature_trajectory,
    plot_density,
    plot_interpolation,
    plot_landscape_1d,
    plot_landscape_1d_panels,
    plot_layer_curvature,
    plot_mask_heatmap,
    plot_mask_summary,
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
    """Right panel: ZSharp's bars are 100 ||e_l||^2 / sum ||e||^2 and SAM's 100 ||g_l||^2 / sum ||g||^2,
    computed per logged step and averaged, by hand here."""
    log = pd.read_csv(runs["zsharp"][1] / "masks.csv")
    fig = plot_mask_summary(log)
    bars = {c.get_label(): [b.get_width() for b in c] for c in fig.axes[1].containers}
    for col, label in (("perturbation_norm", "ZSharp"), ("grad_norm", "SAM (gradient share)")):
        sq = log[col] ** 2
        share = (sq / sq.groupby(log["step"]).transform("sum")).groupby(log["layer"], sort=False).mean() * 100
        np.testing.assert_allclose(bars[label], share.to_numpy())
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
