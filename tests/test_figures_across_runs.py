"""Figures across runs (seeds, sweeps, sharpness vs gap, cost, mask stability) and the honesty fixes
(no zero bars, shared scales, every layer shown), each checked against the data it was given: the
values drawn are read back from the matplotlib artists and compared with numpy/scipy computed here.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from scipy.stats import spearmanr

from sharpscope.plot import (
    aggregate_seeds,
    optimizer_color,
    plot_cost,
    plot_layer_curvature,
    plot_mask_heatmap,
    plot_mask_stability,
    plot_seed_summary,
    plot_sharpness_summary,
    plot_sharpness_vs_gap,
    plot_surfaces,
    plot_sweep,
    rank_correlations,
    style,
    surface_limits,
)
from sharpscope.plot.sweep import _config_label


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _runs(seed: int = 0) -> pd.DataFrame:
    """A grid: SGD x 3 seeds, SAM rho in {0.02, 0.1} x 3 seeds, ZSharp rho 0.05 p in {0.9, 0.95} x 3 seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(3):
        rows.append({"run": f"sgd_s{s}", "optimizer": "sgd", "rho": np.nan, "percentile": np.nan})
        for r in (0.02, 0.1):
            rows.append({"run": f"sam_{r}_s{s}", "optimizer": "sam", "rho": r, "percentile": np.nan})
        for p in (0.9, 0.95):
            rows.append({"run": f"zsharp_{p}_s{s}", "optimizer": "zsharp", "rho": 0.05, "percentile": p})
    df = pd.DataFrame(rows)
    for q in ("test_acc", "lambda_max", "trace", "gap"):
        df[q] = rng.normal(10, 2, len(df))
    return df


def _bar_heights(ax) -> np.ndarray:
    return np.array([p.get_height() for p in ax.patches])


def test_aggregate_seeds_equals_numpy():
    """Mean and sample s.d. (ddof=1) per configuration equal numpy's; a NaN seed is left out of the count."""
    df = _runs()
    df.loc[0, "lambda_max"] = np.nan  # sgd seed 0 not measured
    agg = aggregate_seeds(df, ["optimizer", "rho", "percentile"], ["lambda_max"])
    assert len(agg) == 5
    for _, row in agg.iterrows():
        same = (df["optimizer"] == row["optimizer"]) & (
            (df["rho"] == row["rho"]) | (df["rho"].isna() & pd.isna(row["rho"]))) & (
            (df["percentile"] == row["percentile"]) | (df["percentile"].isna() & pd.isna(row["percentile"])))
        x = df.loc[same, "lambda_max"].dropna().to_numpy()
        assert row["lambda_max"] == pytest.approx(np.mean(x))
        assert row["lambda_max_sd"] == pytest.approx(np.std(x, ddof=1))
        assert row["lambda_max_n"] == len(x)
    assert agg.loc[agg["optimizer"] == "sgd", "lambda_max_n"].item() == 2


def test_seed_summary_draws_means_sds_and_every_seed():
    """Each configuration's marker sits at the mean over seeds with a +-1 s.d. (ddof=1) bar, in the
    optimizer's colour; every seed is a dot; a configuration without the measure has nothing drawn."""
    df = _runs()
    df.loc[df["optimizer"] == "sgd", "trace"] = np.nan
    with style("neurips"):
        fig = plot_seed_summary(df, ["lambda_max", "trace"])
    ax_l, ax_t = fig.axes[:2]
    agg = aggregate_seeds(df, ["optimizer", "rho", "percentile"], ["lambda_max", "trace"])
    means = [c.lines[0].get_xdata()[0] for c in ax_l.containers]
    np.testing.assert_allclose(means, agg["lambda_max"])
    widths = [np.ptp(c.lines[2][0].get_segments()[0][:, 0]) for c in ax_l.containers]
    np.testing.assert_allclose(widths, 2 * agg["lambda_max_sd"])
    assert len(ax_t.containers) == 4  # SGD: no trace, nothing drawn (not a zero)
    np.testing.assert_allclose([c.lines[0].get_xdata()[0] for c in ax_t.containers], agg["trace"].dropna())
    scatters = [c for c in ax_l.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
    dots = np.concatenate([c.get_offsets()[:, 0] for c in scatters])
    np.testing.assert_allclose(np.sort(dots), np.sort(df["lambda_max"]))
    sgd_color = ax_l.containers[0].lines[0].get_color()
    assert plt.matplotlib.colors.to_hex(sgd_color) == optimizer_color("sgd").lower()


def test_sharpness_summary_marks_missing_not_zero():
    """A run without a measure has no bar in that panel and an "n/a" mark; colours follow the optimizer
    column, not the run name."""
    table = pd.DataFrame({"run": ["a", "b"], "optimizer": ["sam", "zsharp"], "lambda_max": [2.0, np.nan]})
    with style("neurips"):
        fig = plot_sharpness_summary(table, ["lambda_max"])
    ax = fig.axes[0]
    assert len(ax.patches) == 1 and ax.patches[0].get_height() == 2.0
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    assert ax.patches[0].get_facecolor()[:3] == pytest.approx(plt.matplotlib.colors.to_rgb(optimizer_color("sam")))


def test_sweep_lines_are_the_means_over_seeds():
    """plot_sweep over rho: SAM's line passes through the per-rho means over seeds; SGD (no rho) is a
    horizontal reference at its mean."""
    df = _runs()
    with style("neurips"):
        fig = plot_sweep(df, "rho", ["test_acc"])
    ax = fig.axes[0]
    sam = [line for line in ax.lines if line.get_label() == "SAM"][0]
    expected = df[df["optimizer"] == "sam"].groupby("rho")["test_acc"].mean()
    np.testing.assert_allclose(sam.get_xdata(), expected.index)
    np.testing.assert_allclose(sam.get_ydata(), expected.to_numpy())
    sgd = [line for line in ax.lines if line.get_label().startswith("SGD")][0]
    assert sgd.get_ydata()[0] == pytest.approx(df.loc[df["optimizer"] == "sgd", "test_acc"].mean())


def test_rank_correlation_equals_scipy_and_scatter_draws_inputs():
    """rank_correlations equals scipy.stats.spearmanr; the scatter's points are the (measure, gap) pairs
    and the panel title states the same coefficient."""
    df = _runs(seed=3)
    corr = rank_correlations(df, ["lambda_max", "trace"], "gap").set_index("measure")
    for m in ("lambda_max", "trace"):
        res = spearmanr(df[m], df["gap"])
        assert corr.loc[m, "spearman"] == pytest.approx(res.statistic)
        assert corr.loc[m, "p_value"] == pytest.approx(res.pvalue)
    with style("neurips"):
        fig = plot_sharpness_vs_gap(df, ["lambda_max", "trace"])
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    expected = df[["lambda_max", "gap"]].to_numpy()
    np.testing.assert_allclose(points[np.lexsort(points.T)], expected[np.lexsort(expected.T)])
    assert f"{corr.loc['lambda_max', 'spearman']:+.2f}" in ax.get_title()


def test_rank_correlation_needs_three_runs():
    """Two runs have no rank correlation: NaN, not a fake +-1."""
    df = pd.DataFrame({"optimizer": ["sgd", "sam"], "lambda_max": [1.0, 2.0], "gap": [3.0, 1.0]})
    assert np.isnan(rank_correlations(df, ["lambda_max"]).loc[0, "spearman"])


def test_cost_bars_are_mean_epoch_time_and_throughput():
    """plot_cost: bar heights equal the mean time_s and images_per_s per optimizer over all epochs of
    all its runs, in OPTIMIZER_ORDER (SGD first, ZSharp last)."""
    rng = np.random.default_rng(0)
    rows = [{"run": f"{o}{s}", "optimizer": o, "epoch": e, "time_s": rng.uniform(1, 3), "images_per_s": rng.uniform(100, 300)}
            for o in ("zsharp", "sgd", "sam") for s in range(2) for e in range(1, 4)]
    df = pd.DataFrame(rows)
    with style("neurips"):
        fig = plot_cost(df)
    for ax, col in zip(fig.axes, ("time_s", "images_per_s")):
        expected = df.groupby("optimizer")[col].mean().loc[["sgd", "sam", "zsharp"]]
        np.testing.assert_allclose(_bar_heights(ax), expected)


def test_mask_stability_mean_line():
    """The black line is the mean mask Jaccard over layers per epoch; one grey line per layer."""
    df = pd.DataFrame({"epoch": [1, 1, 2, 2, 3, 3], "layer": ["a", "b"] * 3,
                       "mask_jaccard": [0.2, 0.4, 0.3, 0.5, 0.6, 0.8], "kept_fraction": [0.05] * 6})
    with style("neurips"):
        fig = plot_mask_stability(df)
    ax = fig.axes[0]
    mean = [line for line in ax.lines if line.get_label().startswith("mean over 2")][0]
    np.testing.assert_allclose(mean.get_ydata(), [0.3, 0.4, 0.7])
    chance = [line for line in ax.lines if line.get_label() == "independent random masks"][0]
    np.testing.assert_allclose(chance.get_ydata(), 0.05 / 1.95)


def test_layer_curvature_dots_and_matrices_only():
    """Dots sit at the given values (no bars); matrices_only leaves out 1-D tensors and says how many."""
    table = pd.DataFrame({"layer": ["l1.0.conv.weight", "l1.0.bn.weight", "l1.0.bn.bias", "fc.weight"],
                          "shape": ["4x3x3x3", "4", "4", "10x4"], "top_eigenvalue": [3.0, 0.5, 0.1, 7.0]})
    with style("neurips"):
        ax = plot_layer_curvature(table)
        assert len(ax.patches) == 1  # the grey band of the second block ("fc"), no bars
        np.testing.assert_allclose(ax.lines[0].get_xdata(), table["top_eigenvalue"])
        ax = plot_layer_curvature(table, matrices_only=True)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [3.0, 7.0])
    assert "2 1-D tensors" in ax.get_xlabel()


def test_surfaces_share_one_scale():
    """plot_surfaces: every panel has the z range log10(min)..log10(max) over ALL slices, and the same
    colour limits, so a 2.5x higher loss looks higher."""
    x = np.linspace(-1, 1, 5)
    xx, yy = np.meshgrid(x, x)
    frames = {name: pd.DataFrame({"x": xx.ravel(), "y": yy.ravel(), "loss": scale * (1 + xx.ravel() ** 2)})
              for name, scale in (("sgd", 1.0), ("zsharp", 2.5))}
    lo, hi = surface_limits(frames)
    assert (lo, hi) == pytest.approx((1.0, 5.0))
    with style("neurips"):
        fig = plot_surfaces(frames)
    for ax in fig.axes[:2]:
        assert ax.get_zlim() == pytest.approx((0.0, np.log10(5.0)))
        assert ax.collections[0].get_clim() == pytest.approx((0.0, np.log10(5.0)))


def test_mask_heatmap_says_when_constant():
    """A value constant up to float noise (the kept fraction) is not stretched over the colour map."""
    df = pd.DataFrame({"step": [1, 1, 2, 2], "layer": ["a", "b"] * 2,
                       "kept_fraction": [0.05, 0.05 + 1e-12, 0.05, 0.05 - 1e-12]})
    with style("neurips"):
        ax = plot_mask_heatmap(df)
    assert "constant" in ax.get_title()
    lo, hi = ax.collections[0].get_clim()
    assert hi - lo > 1.0  # percent units: the 1e-10 % noise spans a negligible part of the map


def test_config_label():
    """Labels name the hyperparameters that vary, in the optimizer's paper spelling."""
    row = pd.Series({"optimizer": "zsharp", "rho": 0.05, "percentile": 0.9})
    assert _config_label(row, ["percentile"]) == "ZSharp (p=0.9)"
    assert _config_label(row, []) == "ZSharp"


def test_interpolation_loss_axes_shared_and_from_zero():
    """Two pairs: both loss panels get the same y range, starting at 0 (0.0048 -> 0.0056 is no cliff)."""
    from sharpscope.plot import plot_interpolations

    alpha = np.linspace(-0.25, 1.25, 7)
    pairs = {name: pd.DataFrame({"alpha": alpha, "loss": base + 0.0008 * alpha ** 2, "accuracy": 99.0 + 0 * alpha})
             for name, base in (("a", 0.0048), ("b", 0.02))}
    with style("neurips"):
        fig = plot_interpolations(pairs, endpoints={"a": ("SGD", "ZSharp"), "b": ("SAM", "ZSharp")})
    loss_axes = [ax for ax in fig.axes if ax.get_ylabel().lower().startswith(("loss", "cross", "training loss"))]
    assert len(loss_axes) == 2
    assert loss_axes[0].get_ylim() == loss_axes[1].get_ylim()
    assert loss_axes[0].get_ylim()[0] == 0.0


def test_zscores_show_every_layer_or_say_which():
    """Fifteen layers: fifteen visible panels by default; with max_layers=4 the figure says "4 of 15"."""
    from sharpscope.plot import plot_zscore_distributions

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"layer": np.repeat([f"l{i}.weight" for i in range(15)], 200), "z": rng.normal(size=3000)})
    with style("neurips"):
        fig = plot_zscore_distributions(df)
        assert sum(ax.get_visible() for ax in fig.axes) == 15
        fig = plot_zscore_distributions(df, max_layers=4)
    assert "first 4 of 15 layers" in fig.get_supxlabel()


def test_sweep_holds_the_other_hyperparameter_fixed():
    """A percentile sweep at rho = 0.05 does not pool ZSharp's runs at rho = 0.1 into its p = 0.95 point,
    and SAM's reference line is its mean at that same rho (computed by hand from the rows)."""
    rows = [{"optimizer": "zsharp", "rho": 0.05, "percentile": p, "test_acc": v}
            for p, v in ((0.9, 90.0), (0.9, 92.0), (0.95, 94.0), (0.95, 96.0))]
    rows += [{"optimizer": "zsharp", "rho": 0.1, "percentile": 0.95, "test_acc": 10.0},
             {"optimizer": "sam", "rho": 0.05, "percentile": np.nan, "test_acc": 50.0},
             {"optimizer": "sam", "rho": 0.1, "percentile": np.nan, "test_acc": 0.0}]
    with style("neurips"):
        fig = plot_sweep(pd.DataFrame(rows), "percentile", ["test_acc"])
    ax = fig.axes[0]
    zsharp = [line for line in ax.lines if line.get_label() == "ZSharp"][0]
    np.testing.assert_allclose(zsharp.get_ydata(), [91.0, 95.0])
    sam = [line for line in ax.lines if line.get_label().startswith("SAM")][0]
    assert sam.get_ydata()[0] == 50.0
    assert "0.05" in fig.get_suptitle()


def test_sweep_overlays_show_one_configuration_per_optimizer():
    """With more than four configurations, overlays keep per optimizer the runs where the sweeps cross
    (rho = 0.05, where p varies; p = 0.95, where rho varies), as picked by hand from this grid."""
    from sharpscope.commands.figures import _overlaid_runs

    rows = [{"run": "sgd", "optimizer": "sgd", "rho": np.nan, "percentile": np.nan}]
    rows += [{"run": f"sam{r}", "optimizer": "sam", "rho": r, "percentile": np.nan} for r in (0.02, 0.05, 0.1)]
    rows += [{"run": f"z{r}", "optimizer": "zsharp", "rho": r, "percentile": 0.95} for r in (0.02, 0.1)]
    rows += [{"run": f"zp{p}", "optimizer": "zsharp", "rho": 0.05, "percentile": p} for p in (0.8, 0.95, 0.99)]
    assert _overlaid_runs(pd.DataFrame(rows)) == {"sgd", "sam0.05", "zp0.95"}


def test_seed_table_rows_sorted_numerically():
    """seed_table: optimizers in OPTIMIZER_ORDER, percentiles in numeric order (0.9 before 0.95 and 0.99)."""
    from sharpscope.commands.summary import seed_table

    table = pd.DataFrame({"run": list("abcd"), "optimizer": ["zsharp", "zsharp", "zsharp", "sgd"],
                          "rho": [0.05, 0.05, 0.05, np.nan], "percentile": [0.99, 0.9, 0.95, np.nan],
                          "test_acc": [1.0, 2.0, 3.0, 4.0]})
    out = seed_table(table)
    assert out["optimizer"].tolist() == ["sgd", "zsharp", "zsharp", "zsharp"]
    assert out["percentile"].tolist()[1:] == [0.9, 0.95, 0.99]
