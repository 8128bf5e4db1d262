r"""ZSharp diagnostics: Z-score distributions, what the filter keeps, and how that evolves.

ZSharp (Yun 2025, arXiv 2505.02369) standardises each weight tensor's gradient,
:math:`z = (g - \mu) / \sigma`, and keeps in the ascent only the entries with
:math:`|z| > \tau = Q_p(|z|)`. These figures show

* the per-layer distribution of :math:`z` against the standard normal :math:`\mathcal N(0, 1)`,
  with :math:`\pm\tau` marked: heavy tails mean a few entries carry most of the gradient;
* per layer, the kept fraction and each layer's share of the squared perturbation norm,
  :math:`\|e_l\|^2 / \sum_k \|e_k\|^2`, next to its share of the squared gradient norm
  (which is exactly SAM's perturbation share, since SAM's :math:`e \propto g`);
* mask statistics over training as a layer x step heatmap;
* alignment/curvature tables as grouped bars, and the alignment of each ascent rule with the top
  Hessian eigenspace.

How many entries the filter keeps: of ``n`` distinct values, ``|z| > Q_p(|z|)`` keeps
:math:`n - 1 - \lfloor p (n - 1) \rfloor` (the linear-interpolation quantile sits between two
order statistics), so ``p = 0.95`` keeps 5 % only of large tensors and more of small ones (2 of 22
entries, 9 %); ties at the threshold keep fewer.

Inputs are tidy tables. Mask statistics have the columns of ``ZSharp.mask_stats``
(``layer, numel, kept, kept_fraction, threshold, grad_norm, perturbation_norm, fallback``), and a
training log (``masks.csv``) adds ``step`` (and ``epoch``). Z-scores are a table with columns
``layer`` and ``z`` (one row per sampled gradient entry), optionally ``threshold`` (the cut
:math:`\tau` in Z units, per layer) and ``optimizer``.

Every function takes its table or result as ``data`` and passes further keyword arguments on to
the matplotlib call that draws it (``stairs``/``plot``, ``barh``, ``pcolormesh``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..errors import UserInputError
from ._bars import grouped_barh, short_layer_name
from ._data import (
    choose,
    data_argument,
    labelled_frame,
    ordered_unique,
    require_columns,
    require_finite,
    to_frame,
)
from .style import OKABE_ITO, figure_axes, figure_width, new_figure, optimizer_color, optimizer_label

__all__ = [
    "plot_zscore_distributions",
    "plot_mask_summary",
    "plot_mask_heatmap",
    "plot_alignment",
    "plot_alignment_summary",
    "read_mask_log",
    "rule_kept_fraction",
]

_NORMAL_STYLE = {"color": "0.25", "linestyle": "--", "linewidth": 0.8}
_VALUE_LABEL = {
    "kept_fraction": "Kept fraction (%)",
    "threshold": r"Threshold $\tau$ ($|z|$)",
    "grad_norm": r"Gradient norm $\|g_l\|$",
    "perturbation_norm": r"Perturbation norm $\|e_l\|$",
    "kept": "Kept entries",
    "perturbation_share": r"Perturbation share $\|e_l\|^2 / \sum_k \|e_k\|^2$",
}


def read_mask_log(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Alias of :func:`sharpscope.analysis.masks.load_mask_log`: a ZSharp mask log (``masks.csv``,
    or a run folder holding one) as a tidy DataFrame."""
    from ..analysis.masks import load_mask_log

    return load_mask_log(path)


def _mask_frame(obj: Any, arg: str) -> pd.DataFrame:
    from .tracking import tracked_masks

    if isinstance(obj, (str, os.PathLike)):
        from ..train.layout import RunLayout

        folder = RunLayout(obj)
        if Path(obj).name == RunLayout.TRACKING or (folder.tracking.is_file() and not folder.masks.is_file()):
            return tracked_masks(obj)  # a run that tracked its masks (SharpnessTracker) instead of logging them
        return read_mask_log(obj)
    if hasattr(obj, "mask_stats") and not isinstance(obj, pd.DataFrame):  # a ZSharp optimizer
        return obj.mask_stats.copy()
    if hasattr(obj, "layer_dataframe"):  # a SharpnessTracker
        return tracked_masks(obj)
    frame = to_frame(obj, arg)
    return tracked_masks(frame) if {"key", "value", "layer"} <= set(frame.columns) else frame


# --- Z-score distributions -------------------------------------------------------------------

def _binned_frame(obj: Any, arg: str) -> pd.DataFrame:
    """A ``ZScoreResult`` as its pooled histogram, with each layer's mean threshold as ``threshold``."""
    if hasattr(obj, "histogram_dataframe"):
        hist = obj.histogram_dataframe("pooled")
        thresholds = obj.to_dataframe("pooled").set_index("layer")["threshold"]
        return hist.assign(threshold=hist["layer"].map(thresholds))
    return to_frame(obj, arg)


def _zscore_table(data: Any) -> pd.DataFrame:
    if isinstance(data, Mapping) and data and not any(hasattr(v, "to_dataframe") or isinstance(v, pd.DataFrame)
                                                      for v in data.values()):
        # {layer: array of z}
        parts = [pd.DataFrame({"layer": str(k), "z": np.asarray(v, float).ravel()}) for k, v in data.items()]
        df = pd.concat(parts, ignore_index=True)
    else:
        df = labelled_frame(data, "data", "optimizer", convert=_binned_frame)
    if _is_binned(df):
        require_columns(df, ["layer", "bin_left", "bin_right", "density"], "data")
        require_finite(df[["bin_left", "bin_right", "density"]].to_numpy(float), "data histogram")
        return df
    require_columns(df, ["layer", "z"], "data")
    require_finite(df["z"].to_numpy(float), "data['z']")
    return df


def _is_binned(df: pd.DataFrame) -> bool:
    """True for a histogram table (``ZScoreResult.histogram_dataframe``): bins and densities, no raw z."""
    return {"bin_left", "bin_right", "density"} <= set(df.columns)


def _layer_histogram(part: pd.DataFrame, edges: np.ndarray, percentile: float | None
                     ) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """(edges, density, tau) of one layer and series: binned here from raw ``z``, or as stored."""
    given = part["threshold"] if "threshold" in part else None
    if _is_binned(part):
        if part.empty:
            return None
        part = part.sort_values("bin_left")
        own = np.append(part["bin_left"].to_numpy(float), part["bin_right"].to_numpy(float)[-1])
        tau = float(given.dropna().iloc[0]) if given is not None and given.notna().any() else None
        return own, part["density"].to_numpy(float), tau
    z = part["z"].to_numpy(float)
    if z.size == 0:
        return None
    hist, _ = np.histogram(z, bins=edges, density=True)
    return edges, hist, _threshold(z, given, percentile)


def _z_limit(df: pd.DataFrame) -> float:
    """Half-width of the z axis: the largest |z| seen (at least 4, at most 12), rounded up."""
    if _is_binned(df):
        seen = df[df["density"] > 0]
        widest = float(np.abs(seen[["bin_left", "bin_right"]].to_numpy(float)).max()) if len(seen) else 4.0
    else:
        widest = float(np.abs(df["z"]).max())
    return float(np.ceil(min(max(widest, 4.0), 12.0)))


def _threshold(z: np.ndarray, given: pd.Series | None, percentile: float | None) -> float | None:
    if given is not None and given.notna().any():
        return float(given.dropna().iloc[0])
    if percentile is None:
        return None
    # The official filter's cut: linear-interpolation p-quantile of |z| (torch.quantile default).
    return float(np.quantile(np.abs(z), percentile))


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def plot_zscore_distributions(data: Any, *, percentile: float | None = 0.95, layers: Sequence[str] | None = None,
                              max_layers: int | None = None, kind: str = "grid", bins: int = 60, log: bool = True,
                              fig: Figure | None = None, **kwargs: Any) -> Figure:
    r"""Per-layer histograms of gradient Z-scores against :math:`\mathcal N(0, 1)`, threshold marked.

    ``data``: a table with columns ``layer, z`` (and optionally ``threshold``, ``optimizer``), a
    mapping ``{layer: array of z}``, a ``ZScoreResult`` (its pooled histogram is drawn, with its
    mean per-batch threshold), a histogram table (``layer, bin_left, bin_right, density``), or a
    mapping ``{optimizer: ZScoreResult or table}`` to overlay runs.
    ``percentile``: ZSharp's ``p``; the threshold :math:`\tau = Q_p(|z|)` is drawn at
    :math:`\pm\tau` and the kept tails are shaded (a ``threshold`` column, when present, wins).
    ``layers``: which layers to draw (default: every layer, or the first ``max_layers`` in model
    order, and then the figure says how many of how many it shows).
    ``kind``: ``"grid"`` (small multiples, log density by default) or ``"ridge"`` (one row per
    layer, shared z axis, linear density). ``kwargs`` go to the call drawing each histogram
    (``ax.stairs`` in the grid, ``ax.plot`` in the ridge).
    """
    choose(kind, ("grid", "ridge"), "kind")
    if percentile is not None and not 0.0 < percentile < 1.0:
        raise UserInputError(f"percentile must be in (0, 1), got {percentile}")
    if bins < 5:
        raise UserInputError(f"bins must be >= 5, got {bins}")
    df = _zscore_table(data)
    names = ordered_unique(df["layer"])
    if layers is not None:
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise UserInputError(f"layers {unknown} are not in the data; it has {names}")
        names = list(layers)
    total = len(names)
    names = names[:max_layers] if max_layers is not None else names
    series = ordered_unique(df["optimizer"]) if "optimizer" in df.columns else [None]
    lim = _z_limit(df)
    edges = np.linspace(-lim, lim, bins + 1)
    grid_x = np.linspace(-lim, lim, 400)
    if kind == "grid":
        fig = _zscore_grid(df, names, series, edges, grid_x, percentile, log, fig, kwargs)
    else:
        fig = _zscore_ridge(df, names, series, edges, grid_x, percentile, fig, kwargs)
    if len(names) < total:
        fig.supxlabel(f"{fig.get_supxlabel()}   (first {len(names)} of {total} layers shown)"
                      if kind == "grid" else f"first {len(names)} of {total} layers shown", fontsize="small")
    return fig


def _series_color(name: str | None, i: int) -> str:
    return optimizer_color(name, i) if name is not None else OKABE_ITO["vermillion"]


def _zscore_grid(df, names, series, edges, grid_x, percentile, log, fig, kwargs) -> Figure:
    n = len(names)
    width = figure_width()
    ncols = min(n, 2 if width < 4 else 4)
    nrows = int(np.ceil(n / ncols))
    panel_h = width / ncols * 0.72
    fig, axes = figure_axes(fig, (nrows * panel_h + 0.45) / width, nrows=nrows, ncols=ncols, width=width,
                            sharex=True, sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax, layer in zip(axes, names):
        for i, s in enumerate(series):
            part = df[(df["layer"] == layer) & ((df["optimizer"] == s) if s is not None else True)]
            found = _layer_histogram(part, edges, percentile)
            if found is None:
                continue
            own, hist, tau = found
            color = _series_color(s, i)
            ax.stairs(hist, own, **{"color": color, "linewidth": 0.9, "fill": False,
                                    "label": optimizer_label(s) if s else None, **kwargs})
            if tau is not None:
                if len(series) == 1:  # overlaid runs: shading would stack into mud; the +-tau lines say it
                    kept = np.where((own[:-1] >= tau) | (own[1:] <= -tau), hist, 0.0)
                    ax.stairs(kept, own, color=color, alpha=0.25, fill=True, linewidth=0)
                for sign in (-1, 1):
                    ax.axvline(sign * tau, color=color, linewidth=0.7, linestyle=":")
        ax.plot(grid_x, _normal_pdf(grid_x), **_NORMAL_STYLE)
        ax.set_xlim(grid_x[0], grid_x[-1])
        ax.set_title(short_layer_name(layer), fontsize="small", pad=2)
        if log:
            ax.set_yscale("log")
    if log:
        axes[0].set_ylim(1e-4, 1.5)
        axes[0].yaxis.set_major_locator(ticker.LogLocator(numticks=4))
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.supxlabel(r"Gradient Z-score $z$", fontsize=axes[0].xaxis.label.get_fontsize())
    fig.supylabel("Density", fontsize=axes[0].yaxis.label.get_fontsize())
    _zscore_legend(fig, series, percentile)
    return fig


def _zscore_legend(fig: Figure, series: list, percentile: float | None) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_series_color(s, i), linewidth=0.9, label=optimizer_label(s) if s else
                      "gradient Z-scores") for i, s in enumerate(series)]
    handles.append(Line2D([], [], label=r"$\mathcal{N}(0, 1)$", **_NORMAL_STYLE))
    if percentile is not None:
        handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=0.7,
                              label=rf"$\pm\tau$, $\tau = Q_{{{percentile:g}}}(|z|)$"))
        if len(series) == 1:
            handles.append(Patch(color=_series_color(series[0], 0), alpha=0.25, linewidth=0,
                                 label="kept by the filter"))
    ncols = len(handles) if figure_width() >= 4 else 2
    fig.legend(handles=handles, loc="outside upper center", ncols=min(ncols, 5))


def _zscore_ridge(df, names, series, edges, grid_x, percentile, fig, kwargs) -> Figure:
    n = len(names)
    width = figure_width()
    fig, (ax,) = figure_axes(fig, (0.5 + 0.28 * n) / width, width=width)
    centers = 0.5 * (edges[1:] + edges[:-1])
    normal = _normal_pdf(centers)
    step = 1.0
    for row, layer in enumerate(names):
        base = (n - 1 - row) * step
        peak = normal.max()
        found = {}
        for s in series:
            part = df[(df["layer"] == layer) & ((df["optimizer"] == s) if s is not None else True)]
            found[s] = _layer_histogram(part, edges, percentile)
            if found[s] is not None:
                peak = max(peak, found[s][1].max())
        scale = 1.6 * step / peak
        ax.plot(centers, base + normal * scale, zorder=3 * row + 2, **_NORMAL_STYLE)
        for i, s in enumerate(series):
            if found[s] is None:
                continue
            own, hist, tau = found[s]
            mid = 0.5 * (own[1:] + own[:-1])
            color = _series_color(s, i)
            ax.fill_between(mid, base, base + hist * scale, color="white", zorder=3 * row, linewidth=0)
            ax.fill_between(mid, base, base + hist * scale, color=color, alpha=0.08, zorder=3 * row + 1,
                            linewidth=0)
            ax.plot(mid, base + hist * scale, **{"color": color, "linewidth": 0.9, "zorder": 3 * row + 1, **kwargs})
            if tau is not None:
                if len(series) == 1:
                    kept = np.abs(mid) > tau
                    ax.fill_between(mid, base, base + np.where(kept, hist, 0) * scale, color=color, alpha=0.3,
                                    zorder=3 * row + 1, linewidth=0, step="mid")
                for sign in (-1, 1):
                    ax.plot([sign * tau] * 2, [base, base + 0.9 * step], color=color, linestyle=":",
                            linewidth=0.8, zorder=3 * row + 2)
    ax.set_yticks([(n - 1 - r) * step for r in range(n)], [short_layer_name(name) for name in names])
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="y", visible=False)
    ax.spines["left"].set_visible(False)
    ax.set_ylim(-0.1, (n - 1) * step + 1.9 * step)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(r"Gradient Z-score $z$")
    _zscore_legend(fig, series, percentile)
    return fig


# --- mask statistics -------------------------------------------------------------------------

def _mask_table(data: Any, arg: str = "data") -> pd.DataFrame:
    df = labelled_frame(data, arg, "optimizer", convert=_mask_frame)
    require_columns(df, ["layer"], arg)
    if "step" not in df.columns and "batch" in df.columns:  # mask_statistics: one row per batch and layer
        df = df.rename(columns={"batch": "step"})
    return df


def rule_kept_fraction(numel: Any, percentile: float) -> np.ndarray:
    r"""The fraction of ``numel`` distinct values that ``|z| > Q_p(|z|)`` keeps: :math:`(n - 1 -
    \lfloor p (n - 1) \rfloor) / n`, with the position :math:`p (n - 1)` rounded as ZSharp's
    own quantile rounds it (float32). ``p = 0.95`` gives 9.1 % of 22 entries, 5.1 % of 216, 5.0 % of 4096."""
    from ..optim.zscore import quantile_position  # lazily: the rule is defined once, with the optimizer

    if not 0.0 < float(percentile) < 1.0:
        raise UserInputError(f"percentile must be in (0, 1), got {percentile}")
    sizes = np.atleast_1d(np.asarray(numel, dtype=np.int64))
    if np.any(sizes < 1):
        raise UserInputError(f"numel must be positive tensor sizes, got {sizes[sizes < 1][:3].tolist()}")
    kept = [n - 1 - quantile_position(percentile, int(n))[0] for n in sizes]
    return np.asarray(kept, dtype=float) / sizes


def _per_layer(df: pd.DataFrame, columns: Sequence[str], group: Sequence[str]) -> pd.DataFrame:
    """One row per (group, layer): the mean over logged steps, in model order."""
    order = {name: i for i, name in enumerate(ordered_unique(df["layer"]))}
    out = df.groupby([*group, "layer"], sort=False)[list(columns)].mean().reset_index()
    return out.sort_values(by=[*group, "layer"], key=lambda c: c.map(order) if c.name == "layer" else c,
                           kind="stable")


@data_argument("stats")
def plot_mask_summary(data: Any, *, percentile: float | None = None, fig: Figure | None = None,
                      **kwargs: Any) -> Figure:
    r"""Two panels per layer: what the mask keeps, and the share of the squared perturbation norm.

    Left panel: with an ``energy_kept`` column (a ``mask_statistics`` result), the share of the
    gradient's squared norm in the kept entries, with the fraction of entries kept marked on each
    row (that fraction alone is fixed by ``p`` and the layer's size: it is not a finding); else the
    kept fraction with the rule's value marked.

    ``data`` (formerly ``stats=``): ``ZSharp.mask_stats`` (or the optimizer itself), a ``masks.csv``
    log or path, a ``mask_statistics`` result (per-step or per-batch rows are averaged), or a mapping
    ``{label: either}`` to compare runs.
    Right panel: ZSharp's share :math:`\|e_l\|^2 / \sum_k \|e_k\|^2` next to the gradient's share
    :math:`\|g_l\|^2 / \sum_k \|g_k\|^2`, which is SAM's perturbation share; when ZSharp's shares are
    all equal (each tensor's perturbation scaled to norm rho) they are a line marked "by
    construction", not bars that would read as a measurement. Layers where the mask was
    empty and ZSharp fell back to SAM are hatched. ``percentile`` marks on each layer the fraction
    the rule keeps of its ``numel`` distinct values, :func:`rule_kept_fraction` (more than
    :math:`1 - p` for small tensors); without a ``numel`` column, a line at :math:`1 - p`.
    ``kwargs`` go to ``ax.barh``.
    """
    df = _mask_table(data)
    require_columns(df, ["kept_fraction", "grad_norm", "perturbation_norm"], "data")
    if percentile is not None and not 0.0 < percentile < 1.0:
        raise UserInputError(f"percentile must be in (0, 1), got {percentile}")
    group = ["optimizer"] if "optimizer" in df.columns else []
    df = df.assign(grad_sq=df["grad_norm"].astype(float) ** 2, pert_sq=df["perturbation_norm"].astype(float) ** 2,
                   fallback=df["fallback"].astype(float) if "fallback" in df.columns else 0.0)
    keys = [*group, "step"] if "step" in df.columns else group  # shares per step, then averaged
    for sq, share in (("grad_sq", "grad_share"), ("pert_sq", "pert_share")):
        df[share] = df[sq] / (df.groupby(keys)[sq].transform("sum") if keys else df[sq].sum())
    energy = "energy_kept" in df.columns and df["energy_kept"].notna().all()
    columns = ["kept_fraction", "grad_share", "pert_share", "fallback"] + (["numel"] if "numel" in df else []) + (
        ["energy_kept"] if energy else [])
    layer = _per_layer(df, columns, group)
    for col in ("kept_fraction", "grad_share", "pert_share") + (("energy_kept",) if energy else ()):
        require_finite(layer[col].to_numpy(float), f"data[{col!r}]")
        layer[col] = layer[col] * 100.0
    layer["fell_back"] = layer["fallback"] > 0
    n_layers = layer["layer"].nunique()
    width = figure_width()
    fig, axes = figure_axes(fig, (0.75 + n_layers * 0.2) / width, ncols=2, width=width, sharey=True)
    hue = "optimizer" if group else None
    if energy:  # the kept fraction is fixed by p and the layer's size; how much gradient it keeps is not
        grouped_barh(layer, "layer", "energy_kept", hue=hue, ax=axes[0], hatch_mask=layer["fell_back"],
                     xlabel=r"Gradient energy kept $\|g \odot m\|^2/\|g\|^2$ (%)",
                     single_color=optimizer_color("zsharp"), **kwargs)
        _mark_kept(axes[0], layer)
    else:
        grouped_barh(layer, "layer", "kept_fraction", hue=hue, ax=axes[0], xlabel="Kept fraction (%)",
                     hatch_mask=layer["fell_back"], single_color=optimizer_color("zsharp"), **kwargs)
        if percentile is not None:
            _mark_rule(axes[0], layer, percentile)
    shares = pd.concat([
        layer.assign(source="SAM (gradient share)", share=layer["grad_share"]),
        layer.assign(source="ZSharp" if not group else layer["optimizer"], share=layer["pert_share"]),
    ], ignore_index=True)
    if group:  # keep the gradient share of the first run only: one reference bar per layer
        first = ordered_unique(layer["optimizer"])[0]
        shares = shares[(shares["source"] != "SAM (gradient share)") | (shares["optimizer"] == first)]
    pert = layer["pert_share"].to_numpy(float)
    by_construction = not group and np.ptp(pert) <= 1e-6 * max(float(pert.max()), 1e-12)
    if by_construction:  # every tensor's perturbation has norm rho: the share 1/L is no measurement
        shares = shares[shares["source"] == "SAM (gradient share)"]
    grouped_barh(shares, "layer", "share", hue="source", ax=axes[1], xlabel="Share of squared norm (%)",
                 order=ordered_unique(layer["layer"]), **kwargs)
    if by_construction:
        axes[1].axvline(float(pert.mean()), color=optimizer_color("zsharp"), linestyle=":", linewidth=1.0,
                        label=f"ZSharp: 1/{len(pert)} of it per layer (by construction)")
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if layer["fell_back"].any():
        handles.append(Patch(facecolor="0.6", hatch="////", edgecolor="white", label="fell back to SAM"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4))
    return fig


def _mark_kept(ax: Axes, layer: pd.DataFrame) -> None:
    """On each row, the fraction of the entries the mask keeps (what the energy is compared with)."""
    rows = {name: i for i, name in enumerate(ordered_unique(layer["layer"]))}
    per_layer = layer.drop_duplicates("layer")
    ax.plot(per_layer["kept_fraction"], [rows[name] for name in per_layer["layer"]], linestyle="none",
            marker="|", markersize=9, markeredgewidth=1.2, color="0.15", zorder=4, label="entries kept (%)")


def _mark_rule(ax: Axes, layer: pd.DataFrame, percentile: float) -> None:
    """On each row, the kept fraction the rule gives for the layer's size; or one line at 1 - p."""
    if "numel" not in layer.columns or not np.isfinite(layer["numel"].to_numpy(float)).all():
        ax.axvline(100.0 * (1.0 - percentile), color="0.3", linestyle=":", linewidth=0.8,
                   label=rf"$1 - p$ = {100 * (1 - percentile):g}% (large tensors)")
        return
    rows = {name: i for i, name in enumerate(ordered_unique(layer["layer"]))}
    per_layer = layer.drop_duplicates("layer")
    rule = 100.0 * rule_kept_fraction(per_layer["numel"].round().astype(np.int64), percentile)
    ax.plot(rule, [rows[name] for name in per_layer["layer"]], linestyle="none", marker="|", markersize=9,
            markeredgewidth=1.2, color="0.15", zorder=4,
            label=rf"rule for $p = {percentile:g}$: $(n - 1 - \lfloor p(n - 1) \rfloor) / n$")


@data_argument("log")
def plot_mask_heatmap(data: Any, value: str = "kept_fraction", *, x: str = "step", cmap: str = "cividis",
                      ax: Axes | None = None, **kwargs: Any) -> Axes:
    """A layer x step heatmap of a mask statistic logged during ZSharp training.

    ``data`` (formerly ``log=``): the ``masks.csv`` training log (path, run folder or DataFrame
    with ``step``, ``layer`` and ``value``), or the ``masks`` rows a
    :class:`~sharpscope.track.SharpnessTracker` tracked (its ``tracking.jsonl``, a run folder holding
    only that, the tracker, or :func:`~sharpscope.track.read_tracking_layers` rows; see
    :func:`~sharpscope.plot.tracked_masks`); ``value`` is any numeric mask column (``kept_fraction``
    is drawn in percent). Steps may be unevenly spaced; each cell spans the interval to the next
    logged step. A value constant to float precision (the kept fraction is fixed by ``p`` and the
    layer's size; the perturbation norm of every tensor is rho) is drawn in one colour and said so
    in the title, not stretched over the colour map. ``kwargs`` go to ``ax.pcolormesh``.
    """
    df = _mask_frame(data, "data")
    require_columns(df, ["layer", x, value], "data")
    table = df.pivot_table(index="layer", columns=x, values=value, aggfunc="mean", sort=False)
    table = table.reindex(index=ordered_unique(df["layer"]))
    table = table.reindex(columns=np.sort(table.columns.to_numpy()))
    z = table.to_numpy(float) * (100.0 if value == "kept_fraction" else 1.0)
    if np.isnan(z).all():
        raise UserInputError(f"data[{value!r}] is NaN everywhere: nothing to draw")
    steps = table.columns.to_numpy(float)
    if steps.size > 1:
        edges = np.concatenate([[steps[0] - 0.5 * (steps[1] - steps[0])], 0.5 * (steps[1:] + steps[:-1]),
                                [steps[-1] + 0.5 * (steps[-1] - steps[-2])]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    n = len(table.index)
    if ax is None:
        width = figure_width()
        _, ax = new_figure(aspect=min(max(0.6 + 0.16 * n, 1.4), 8.0) / width, width=width)
    finite = z[np.isfinite(z)]
    flat = float(np.ptp(finite)) <= 1e-6 * max(float(np.abs(finite).max()), 1e-12)
    if flat:  # float noise around one value must not be stretched over the whole colour map
        kwargs = {"vmin": float(finite.mean()) - 1.0, "vmax": float(finite.mean()) + 1.0, **kwargs} \
            if finite.mean() == 0 else {"vmin": 0.5 * finite.mean(), "vmax": 1.5 * finite.mean(), **kwargs}
    mesh = ax.pcolormesh(edges, np.arange(n + 1), np.ma.masked_invalid(z),
                         **{"cmap": cmap, "shading": "flat", "rasterized": True, **kwargs})
    if flat:
        ax.set_title(f"constant over steps and layers ({finite.mean():.4g}): nothing varies", fontsize="small")
    ax.set_yticks(np.arange(n) + 0.5, [short_layer_name(name) for name in table.index])
    ax.set_ylim(n, 0)
    ax.tick_params(axis="y", length=0)
    ax.grid(False)
    ax.set_xlabel("Training step" if x == "step" else x.capitalize())
    cb = ax.figure.colorbar(mesh, ax=ax, pad=0.02, aspect=30, fraction=0.05)
    cb.set_label(_VALUE_LABEL.get(value, value.replace("_", " ")))
    cb.outline.set_linewidth(0.5)
    return ax


@data_argument("table")
def plot_alignment(data: Any, values: str | Sequence[str] | None = None, *, category: str = "layer",
                   hue: str | None = "optimizer", ax: Axes | None = None, xlabel: str | None = None,
                   **kwargs: Any) -> Axes:
    """Grouped horizontal bars for a per-layer alignment or curvature table.

    ``data`` (formerly ``table=``): one row per ``category`` (default ``layer``) and optionally per
    ``hue`` (default ``optimizer``). ``values``: the numeric column to draw, or several columns (then
    drawn side by side, one colour per column; ``hue`` must then be absent). By default every numeric
    column except counts. Cosine similarities lie in [-1, 1]; a zero line is drawn when values change
    sign. ``kwargs`` go to ``ax.barh``.
    """
    df = labelled_frame(data, "data", "optimizer")
    require_columns(df, [category], "data")
    if values is None:
        values = [c for c in df.select_dtypes("number").columns if c not in ("numel", "kept", "step", "epoch")]
    if isinstance(values, str):
        values = [values]
    require_columns(df, values, "data")
    if not values:
        raise UserInputError("data has no numeric column to draw; pass values=...")
    if len(values) > 1:
        if hue is not None and hue in df.columns and df[hue].nunique() > 1:
            raise UserInputError(f"draw several values for one {hue} at a time, or one value across {hue}s")
        df = df.melt(id_vars=[category], value_vars=list(values), var_name="quantity", value_name="value")
        hue_col, value_col = "quantity", "value"
    else:
        hue_col = hue if hue is not None and hue in df.columns else None
        value_col = values[0]
    require_finite(df[value_col].to_numpy(float), f"data[{value_col!r}]")
    label = xlabel if xlabel is not None else (value_col.replace("_", " ") if len(values) == 1 else "Value")
    ax = grouped_barh(df, category, value_col, hue=hue_col, ax=ax, xlabel=label, **kwargs)
    v = df[value_col].to_numpy(float)
    if v.min() < 0 < v.max():
        ax.axvline(0.0, color="0.3", linewidth=0.6)
    return ax


#: Display names of the ascent rules compared by ``perturbation_alignment``.
ASCENT_LABELS = {"sam": "SAM", "zsharp": "ZSharp", "zsharp_global": "ZSharp (global norm)", "asam": "ASAM",
                 "random": "random"}


def _first_settings(data: Any) -> dict[str, Any]:
    items = data.values() if isinstance(data, Mapping) else [data]
    return next((dict(v.settings) for v in items if isinstance(getattr(v, "settings", None), Mapping)), {})


def _power_of_ten(values: np.ndarray) -> int:
    """The exponent to put in an axis label instead of an offset text that collides with it (0: none)."""
    peak = float(np.nanmax(np.abs(values))) if values.size else 0.0
    exponent = int(np.floor(np.log10(peak))) if peak > 0 and np.isfinite(peak) else 0
    return exponent if exponent < -1 or exponent > 2 else 0


def plot_alignment_summary(data: Any, *, k: int | None = None, rho: float | None = None,
                           fig: Figure | None = None, **kwargs: Any) -> Figure:
    r"""Two panels, ascent rules as rows and one bar per model (the demo's ``alignment`` figure).

    Left: :math:`\|V_k^\top e\| / \|e\|`, the part of each ascent direction :math:`e` in the top-k
    Hessian eigenspace; right: the loss increase :math:`L(w + e) - L(w)` at the common radius
    :math:`\|e\| = \rho`. ``data``: a ``perturbation_alignment`` result, its ``to_dataframe()``
    table (``method, cos_subspace, loss_increase``), or a mapping ``{model label: either}`` to
    compare models. ``k`` and ``rho`` default to the result's settings. ``kwargs`` go to ``ax.barh``.
    """
    from matplotlib.ticker import MaxNLocator

    table = labelled_frame(data, "data", "optimizer")
    require_columns(table, ["method", "cos_subspace", "loss_increase"], "data")
    table["method"] = table["method"].map(lambda m: ASCENT_LABELS.get(m, m))
    settings = _first_settings(data)
    k = k if k is not None else settings.get("k")
    rho = rho if rho is not None else settings.get("rho")
    n_rows, n_runs = table["method"].nunique(), table["optimizer"].nunique() if "optimizer" in table else 1
    fig, axes = figure_axes(fig, min(0.15 + 0.02 * n_rows * (n_runs + 1), 1.0), ncols=2, sharey=True)
    space = rf"$\|V_{{{int(k)}}}^\top e\| / \|e\|$" + f"\n(top-{int(k)} eigenspace)" if k else \
        r"$\|V^\top e\| / \|e\|$" + "\n(top eigenspace)"
    plot_alignment(table, "cos_subspace", category="method", ax=axes[0], xlabel=space, **kwargs)
    exponent = _power_of_ten(table["loss_increase"].to_numpy(float))
    table["loss_increase_scaled"] = table["loss_increase"] / 10.0**exponent
    unit = rf" $[\times 10^{{{exponent}}}]$" if exponent else ""
    radius = "\n" + rf"($\|e\| = {float(rho):g}$)" if rho is not None else ""
    plot_alignment(table, "loss_increase_scaled", category="method", ax=axes[1],
                   xlabel="$L(w + e) - L(w)$" + unit + radius, **kwargs)
    axes[1].set_ylabel("")
    axes[0].set_ylabel("Ascent direction")
    for ax in axes:  # few ticks: the panels are narrow in a one-column figure
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:  # the bars are models, the rows ascent rules: say which is which
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(handles) + 1, 7),
                   title="Model trained with:", alignment="left")
    return fig
