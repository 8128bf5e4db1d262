"""Figures across many runs: seeds aggregated, rho/percentile sweeps, sharpness vs generalization, cost.

Each function takes a *run table*: one row per trained run (not per checkpoint: the epoch checkpoints
of one run are a trajectory, see :func:`sharpscope.commands.figures.run_table`), with an ``optimizer``
column, the hyperparameters (``rho``, ``percentile``) and the measured quantities. Runs that share
every hyperparameter but the seed are one *configuration*; a configuration is drawn as the mean over
its seeds with an error bar of one sample standard deviation (``ddof=1``), and every seed as a dot,
so that an error bar of two seeds is never mistaken for a tight one. A run without a value for a
quantity is left out of that panel (never drawn as zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure

from ..errors import UserInputError
from ._data import ordered_unique, require_columns, to_frame
from .style import figure_axes, optimizer_label, optimizer_marker, optimizer_rank, series_colors

__all__ = ["QUANTITY_LABELS", "aggregate_seeds", "rank_correlations", "plot_seed_summary", "plot_sweep",
           "plot_sharpness_vs_gap", "plot_cost", "plot_mask_stability"]

#: Axis labels of the run-table columns.
QUANTITY_LABELS: dict[str, str] = {
    "test_acc": "Test accuracy (%)", "train_acc": "Train accuracy (%)", "gap": "Train $-$ test accuracy (pp)",
    "lambda_max": r"$\lambda_{\max}$", "trace": r"tr$(H)$", "sharpness_worst": "Worst-case sharpness",
    "sharpness_average": "Average sharpness", "rho": r"$\rho$", "percentile": "ZSharp percentile $p$",
    "time_per_epoch": "Wall time per epoch (s)", "images_per_s": "Throughput (images/s)",
}


#: Panel titles of the narrow panels of :func:`plot_seed_summary`.
_SHORT_TITLES = {"test_acc": "Test acc. (%)", "sharpness_worst": "Sharpness\n(worst case)",
                 "sharpness_average": "Sharpness\n(average)"}


def aggregate_seeds(data: Any, by: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean, sample s.d. (``ddof=1``) and count over the rows of each group ``by`` (the seeds).

    Columns: ``by``, then ``<v>`` (mean), ``<v>_sd`` and ``<v>_n`` for every ``v`` in ``values``
    present; NaN values (a run without that measure) are left out of the group, so ``<v>_n`` counts
    only measured seeds; ``<v>_sd`` is NaN with fewer than two. Groups keep their first-seen order.
    """
    df = to_frame(data, "data")
    require_columns(df, list(by), "data")
    values = [v for v in values if v in df.columns]
    keys = df[list(by)].astype(object).where(df[list(by)].notna(), "-")
    rows = []
    for key, part in df.groupby([keys[c] for c in by], sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, part[list(by)].iloc[0]))
        for v in values:
            x = part[v].to_numpy(float)
            x = x[np.isfinite(x)]
            row[v] = float(np.mean(x)) if x.size else np.nan
            row[f"{v}_sd"] = float(np.std(x, ddof=1)) if x.size > 1 else np.nan
            row[f"{v}_n"] = int(x.size)
        rows.append(row)
    return pd.DataFrame(rows)


def rank_correlations(data: Any, measures: Sequence[str], target: str = "gap") -> pd.DataFrame:
    """Spearman's rank correlation of each measure with ``target`` over the runs (NaN rows dropped).

    Columns ``measure, spearman, p_value, n``; fewer than three runs give NaN (no rank correlation).
    """
    from scipy.stats import spearmanr

    df = to_frame(data, "data")
    rows = []
    for m in measures:
        if m not in df.columns or target not in df.columns:
            continue
        part = df[[m, target]].astype(float).dropna()
        if len(part) >= 3 and part[m].nunique() > 1 and part[target].nunique() > 1:
            res = spearmanr(part[m], part[target])
            rho, p = float(res.statistic), float(res.pvalue)
        else:
            rho, p = np.nan, np.nan
        rows.append({"measure": m, "spearman": rho, "p_value": p, "n": len(part)})
    return pd.DataFrame(rows, columns=["measure", "spearman", "p_value", "n"])


def _optimizers(df: pd.DataFrame) -> list[str]:
    return sorted(ordered_unique(df["optimizer"].astype(str)), key=lambda o: (optimizer_rank(o), o))


def _config_label(row: pd.Series, varying: Sequence[str]) -> str:
    parts = [optimizer_label(row["optimizer"])]
    for c in varying:
        if c in row and pd.notna(row[c]):
            parts.append(f"{'p' if c == 'percentile' else c}={row[c]:g}")
    return ", ".join(parts) if len(parts) < 2 else f"{parts[0]} ({', '.join(parts[1:])})"


def plot_seed_summary(data: Any, quantities: Sequence[str] = ("test_acc", "lambda_max", "trace",
                                                              "sharpness_worst", "sharpness_average"), *,
                      config: Sequence[str] = ("optimizer", "rho", "percentile"), fig: Figure | None = None,
                      **kwargs: Any) -> Figure:
    """One panel per quantity, one row per configuration (shared across panels): the mean over its
    seeds as a large marker with a +-1 s.d. bar (``ddof=1``), each seed as a small dot. Dots, not
    bars: the axes need not start at zero, so 92 % vs 94 % accuracy stays visible. A configuration
    without a value for a quantity has nothing in that row of the panel. ``kwargs`` go to
    ``ax.errorbar``."""
    df = to_frame(data, "data")
    require_columns(df, ["optimizer"], "data")
    config = [c for c in config if c in df.columns]
    shown = [q for q in quantities if q in df.columns and df[q].notna().any()]
    if not shown:
        raise UserInputError(f"data has none of the columns {list(quantities)}; it has {list(df.columns)}")
    agg = aggregate_seeds(df, config, shown)
    agg = agg.assign(_r=agg["optimizer"].map(optimizer_rank)).sort_values(["_r", *config], kind="stable")
    agg = agg.drop(columns="_r").reset_index(drop=True)
    varying = [c for c in config if c != "optimizer" and agg[c].nunique(dropna=True) > 1]
    labels = [_config_label(r, varying) for _, r in agg.iterrows()]
    colors = series_colors(agg["optimizer"].astype(str))
    fig, axes = figure_axes(fig, min(0.12 + 0.045 * len(agg), 0.9), ncols=len(shown), sharey=True)
    for ax, q in zip(axes, shown):
        _seed_panel(ax, df, agg, q, config, colors, **kwargs)
    axes[0].set_yticks(range(len(agg)), labels)
    axes[0].set_ylim(len(agg) - 0.5, -0.5)
    n_seeds = sorted({int(n) for q in shown for n in agg[f"{q}_n"] if n > 0})
    fig.suptitle(f"mean $\\pm$ 1 s.d. over {'/'.join(map(str, n_seeds))} seed(s); small dots: single seeds",
                 fontsize="small")
    return fig


def _seed_panel(ax: Any, df: pd.DataFrame, agg: pd.DataFrame, q: str, config: list[str],
                colors: dict[str, str], **kwargs: Any) -> None:
    for i, row in agg.iterrows():
        if row[f"{q}_n"] == 0:
            continue  # not measured: nothing drawn (never a zero)
        color = colors[str(row["optimizer"])]
        same = np.ones(len(df), bool)
        for c in config:
            same &= ((df[c].isna() & pd.isna(row[c])) | (df[c] == row[c])).to_numpy()
        seeds = df.loc[same, q].dropna().to_numpy(float)
        ax.scatter(seeds, np.full(seeds.size, i) + np.linspace(-0.12, 0.12, seeds.size), s=5, color=color,
                   alpha=0.6, zorder=3, linewidths=0)
        ax.errorbar([row[q]], [i], xerr=[np.nan_to_num(row[f"{q}_sd"])], **{
            "fmt": optimizer_marker(str(row["optimizer"])), "color": color, "markersize": 4, "elinewidth": 0.9,
            "capsize": 2, "zorder": 4, **kwargs})
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="y", visible=False)
    ax.set_title(_SHORT_TITLES.get(q, QUANTITY_LABELS.get(q, q.replace("_", " "))), fontsize="medium")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(3))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4), useMathText=True)


def plot_sweep(data: Any, x: str = "rho", quantities: Sequence[str] = ("test_acc", "lambda_max"), *,
               fig: Figure | None = None, **kwargs: Any) -> Figure:
    """``quantities`` against hyperparameter ``x`` (``rho`` or ``percentile``): one line per optimizer
    at the mean over seeds, a band of +-1 s.d., every seed a dot. Only runs with ``x`` set are used
    (SGD has no rho: it is drawn as a horizontal reference line when present); every other
    hyperparameter is held at one value (:func:`hold_fixed`, named above the panels), so runs at other
    settings are never pooled into a point. ``kwargs`` go to ``ax.plot``."""
    df = to_frame(data, "data")
    require_columns(df, ["optimizer", x], "data")
    shown = [q for q in quantities if q in df.columns and df[q].notna().any()]
    if not shown:
        raise UserInputError(f"data has none of the columns {list(quantities)}; it has {list(df.columns)}")
    df, fixed = hold_fixed(df, x)
    swept, flat = df[df[x].notna()], df[df[x].isna()]
    if swept[x].nunique() < 2:
        raise UserInputError(f"a sweep over {x} needs runs at two or more values of {x}; found "
                             f"{sorted(swept[x].unique().tolist())}")
    fig, axes = figure_axes(fig, 0.42 if len(shown) > 1 else 0.62, ncols=len(shown))
    names = _optimizers(df)
    colors = series_colors(names)
    for ax, q in zip(axes, shown):
        for i, name in enumerate(names):
            _sweep_line(ax, swept[swept["optimizer"].astype(str) == name], flat[flat["optimizer"].astype(str) == name],
                        x, q, colors[name], optimizer_marker(name, i), optimizer_label(name), **kwargs)
        ax.set_xlabel(QUANTITY_LABELS.get(x, x))
        ax.set_ylabel(QUANTITY_LABELS.get(q, q))
        ax.set_xticks(sorted(swept[x].unique()))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axes[0].legend(loc="best")
    if fixed:
        fig.suptitle("held fixed: " + ", ".join(f"{QUANTITY_LABELS.get(c, c)} = {v:g}" for c, v in fixed.items())
                     + "; mean $\\pm$ 1 s.d. over seeds, dots: single seeds", fontsize="small")
    return fig


def hold_fixed(df: pd.DataFrame, x: str, others: Sequence[str] = ("rho", "percentile")
               ) -> tuple[pd.DataFrame, dict[str, float]]:
    """The runs of a sweep over ``x`` with every other hyperparameter held at one value.

    For each other column the value kept is the one at which ``x`` takes the most distinct values
    (then the most runs): a ZSharp percentile sweep at rho = 0.05 is not pooled with the runs at other
    radii, and SAM's reference line uses the same rho. Runs without that hyperparameter (NaN: SGD
    has no rho) are kept. Returns the rows kept and ``{column: value held}``.
    """
    fixed: dict[str, float] = {}
    for c in others:
        if c == x or c not in df.columns or df[c].nunique(dropna=True) < 2:
            continue
        swept = df[df[x].notna() & df[c].notna()]
        if swept.empty:
            continue
        spread = swept.groupby(c)[x].agg(["nunique", "size"]).sort_values(["nunique", "size"], ascending=False)
        fixed[c] = float(spread.index[0])
        df = df[df[c].isna() | np.isclose(df[c].astype(float), fixed[c])]
    return df, fixed


def _sweep_line(ax: Any, part: pd.DataFrame, flat: pd.DataFrame, x: str, q: str, color: str, marker: str,
                label: str, **kwargs: Any) -> None:
    part = part[part[q].notna()]
    if not part.empty:
        agg = aggregate_seeds(part, [x], [q]).sort_values(x)
        xs, mean, sd = agg[x].to_numpy(float), agg[q].to_numpy(float), np.nan_to_num(agg[f"{q}_sd"].to_numpy(float))
        ax.plot(xs, mean, **{"color": color, "marker": marker, "markersize": 3.5, "label": label, **kwargs})
        ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.15, linewidth=0)
        ax.scatter(part[x], part[q], s=5, color=color, alpha=0.6, linewidths=0, zorder=3)
    flat = flat[flat[q].notna()]
    if not flat.empty:  # a method without this hyperparameter (SGD has no rho): its mean as a reference
        ax.axhline(float(flat[q].mean()), color=color, linestyle=(0, (1, 1.5)), linewidth=0.9,
                   label=f"{label} (no {x}, mean of {len(flat)})")


def plot_sharpness_vs_gap(data: Any, measures: Sequence[str] = ("lambda_max", "trace", "sharpness_worst",
                                                               "sharpness_average"), gap: str = "gap", *,
                          fig: Figure | None = None, **kwargs: Any) -> Figure:
    """One panel per sharpness measure: the measure (x) against the generalization gap (y) of every run,
    coloured and marked by optimizer, titled with Spearman's rank correlation over the runs
    (:func:`rank_correlations`; "n/a" below three runs). ``kwargs`` go to ``ax.scatter``."""
    df = to_frame(data, "data")
    require_columns(df, ["optimizer", gap], "data")
    shown = [m for m in measures if m in df.columns and df[[m, gap]].notna().all(axis=1).any()]
    if not shown:
        raise UserInputError(f"data has none of the measures {list(measures)} together with {gap!r}")
    corr = rank_correlations(df, shown, gap).set_index("measure")
    ncols = 2 if len(shown) > 2 else len(shown)
    nrows = -(-len(shown) // ncols)
    fig, axes = figure_axes(fig, 0.36 * nrows + 0.08 if ncols == 2 else 0.55, nrows=nrows, ncols=ncols,
                            sharey=True)
    axes = np.ravel(axes)
    names = _optimizers(df)
    colors = series_colors(names)
    for ax, m in zip(axes, shown):
        scale = _power_of_ten(df[m])  # in the label, not as an offset text that collides with it
        for i, name in enumerate(names):
            part = df[(df["optimizer"].astype(str) == name) & df[m].notna() & df[gap].notna()]
            marker = optimizer_marker(name, i)
            ax.scatter(part[m] / 10.0 ** scale, part[gap], **{"s": 22 if marker == "*" else 12, "color": colors[name],
                                                              "marker": marker, "label": optimizer_label(name),
                                                              "linewidths": 0, **kwargs})
        r, p, n = corr.loc[m, "spearman"], corr.loc[m, "p_value"], int(corr.loc[m, "n"])
        ax.set_title(rf"Spearman $r_s$ = {r:+.2f} (n = {n}, p = {p:.1g})" if np.isfinite(r)
                     else f"Spearman n/a (n = {n})", fontsize="small")
        ax.set_xlabel(QUANTITY_LABELS.get(m, m) + (rf" ($\times 10^{{{scale}}}$)" if scale else ""))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(QUANTITY_LABELS.get(gap, gap))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(handles))
    return fig


def _power_of_ten(values: pd.Series) -> int:
    """The exponent that brings values below 1e-2 or above 1e4 into a readable range (else 0)."""
    top = float(np.nanmax(np.abs(values.to_numpy(float)))) if values.notna().any() else 0.0
    return int(np.floor(np.log10(top))) if top > 0 and not 1e-2 <= top < 1e4 else 0


def plot_cost(data: Any, *, fig: Figure | None = None, **kwargs: Any) -> Figure:
    """Wall time per epoch and training throughput per optimizer, from ``metrics.jsonl`` histories.

    ``data``: a DataFrame with ``optimizer``, ``time_s`` (the epoch's wall time) and ``images_per_s``
    columns, one row per (run, epoch). Bars are the mean over all epochs of all runs of an optimizer,
    +-1 s.d. (``ddof=1``), dots the per-run means. ``kwargs`` go to ``ax.bar``.
    """
    df = to_frame(data, "data").rename(columns={"time_s": "time_per_epoch"})
    require_columns(df, ["optimizer", "time_per_epoch", "images_per_s"], "data")
    fig, axes = figure_axes(fig, 0.38, ncols=2)
    names = _optimizers(df)
    colors = series_colors(names)
    for ax, q in zip(axes, ("time_per_epoch", "images_per_s")):
        agg = aggregate_seeds(df, ["optimizer"], [q]).set_index("optimizer").loc[names]
        pos = np.arange(len(names))
        ax.bar(pos, agg[q].to_numpy(float), **{
            "width": 0.65, "color": [colors[n] for n in names], "alpha": 0.85, "linewidth": 0,
            "yerr": np.nan_to_num(agg[f"{q}_sd"].to_numpy(float)),
            "error_kw": {"elinewidth": 0.7, "capsize": 2, "ecolor": "0.2"}, **kwargs})
        if "run" in df.columns:
            per_run = df.groupby(["optimizer", "run"], sort=False)[q].mean().reset_index()
            ax.scatter(per_run["optimizer"].map({n: i for i, n in enumerate(names)}), per_run[q], s=5,
                       color="0.1", zorder=3, linewidths=0)
        ticks = [optimizer_label(n) for n in names]
        if q == "time_per_epoch" and names[0] in ("sgd", "adam", "adamw"):  # cost relative to the baseline
            ticks = [f"{t}\n({v / agg[q].iloc[0]:.1f}x)" for t, v in zip(ticks, agg[q].to_numpy(float))]
        ax.set_xticks(pos, ticks)
        ax.tick_params(axis="x", length=0)
        ax.grid(axis="x", visible=False)
        ax.set_title(QUANTITY_LABELS[q], fontsize="medium")
    fig.suptitle("mean $\\pm$ 1 s.d. over all epochs of all runs; dots: per-run means (this machine)",
                 fontsize="small")
    return fig


def plot_mask_stability(data: Any, x: str = "epoch", *, fig: Figure | None = None, **kwargs: Any) -> Figure:
    """ZSharp's mask stability: the mean pairwise Jaccard index of the masks of different batches
    (``mask_jaccard`` of :func:`~sharpscope.analysis.masks.mask_statistics`), per layer against ``x``
    (the epoch of each analysed checkpoint), with the mean over layers in black. 1 means every batch
    keeps the same entries; a random mask keeping a fraction f of the entries gives about f/(2-f).
    ``data``: one row per (checkpoint, layer) with ``x``, ``layer``, ``mask_jaccard`` (and optionally
    ``kept_fraction``, drawn as that chance level). ``kwargs`` go to ``ax.plot``."""
    df = to_frame(data, "data")
    require_columns(df, [x, "layer", "mask_jaccard"], "data")
    df = df[df["mask_jaccard"].notna()]
    if df.empty:
        raise UserInputError("data has no finite mask_jaccard (it needs masks of two or more batches)")
    fig, axes = figure_axes(fig, 0.55)
    ax = axes[0]
    layers = ordered_unique(df["layer"])
    for layer in layers:
        part = df[df["layer"] == layer].sort_values(x)
        ax.plot(part[x], part["mask_jaccard"], **{"color": "0.65", "linewidth": 0.6, "marker": ".",
                                                  "markersize": 2, **kwargs})
    mean = df.groupby(x)["mask_jaccard"].mean()
    ax.plot(mean.index, mean.to_numpy(), color="black", linewidth=1.4, marker="o", markersize=3,
            label=f"mean over {len(layers)} layers")
    ax.plot([], [], color="0.65", linewidth=0.6, label="one layer")
    if "kept_fraction" in df.columns:
        f = df.groupby(x)["kept_fraction"].mean()
        ax.plot(f.index, (f / (2 - f)).to_numpy(), color="0.3", linestyle=(0, (1, 1.5)), linewidth=0.9,
                label="independent random masks")
    ax.set_xlabel(x.capitalize())
    ax.set_ylabel("Mask Jaccard across batches")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(loc="best")
    return fig
