"""Hessian spectra: eigenvalue density, curvature over training, per-layer curvature.

The density is the stochastic Lanczos quadrature estimate (Ghorbani, Krishnan & Xiao 2019,
"An investigation into neural net optimization via Hessian eigenvalue density"): a Gaussian-smoothed
sum of Ritz values. It spans many orders of magnitude -- a bulk near zero and a few outliers -- so it
is drawn on a log density axis, with the top-k eigenvalues (from Lanczos) marked above it.

Over training, the top eigenvalue is compared with 2/eta: full-batch gradient descent with learning
rate eta is stable on a quadratic only while lambda_max < 2/eta (Cohen et al. 2021, "Gradient descent
on neural networks typically occurs at the edge of stability").

Every function takes what it draws as ``data`` and passes further keyword arguments on to the
matplotlib call that draws it (``plot`` for curves, ``barh``/``bar`` for bars).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker, transforms
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import UserInputError
from ._bars import bar_axes, finish_layer_axis, short_layer_name
from ._data import data_argument, labelled_frame, ordered_unique, require_columns, require_finite, to_frame
from .style import (
    figure_axes,
    legend_columns,
    new_figure,
    optimizer_label,
    optimizer_marker,
    series_colors,
    short_label,
)

__all__ = ["plot_density", "plot_curvature_trajectory", "plot_curvature_trajectories", "plot_layer_curvature",
           "plot_sharpness_summary"]

_QUANTITY_LABEL = {
    "lambda_max": r"Top eigenvalue $\lambda_{\max}$",
    "trace": r"Hessian trace $\mathrm{tr}(H)$",
    "top_eigenvalue": r"Top eigenvalue $\lambda_{\max}$",
}
# layer_curvature names the top eigenvalue ``top_eigenvalue``; trajectories may use either name.
_ALIASES = {"lambda_max": "top_eigenvalue", "top_eigenvalue": "lambda_max"}


def _column(df: pd.DataFrame, quantity: str) -> str:
    if quantity not in df.columns and _ALIASES.get(quantity) in df.columns:
        return _ALIASES[quantity]
    return quantity


def _density_arrays(obj: Any, arg: str) -> tuple[np.ndarray, np.ndarray]:
    """(grid, density) from a DensityResult-like object or a DataFrame ``eigenvalue, density``."""
    if hasattr(obj, "grid") and hasattr(obj, "density"):
        grid, density = np.asarray(obj.grid, float), np.asarray(obj.density, float)
    else:
        df = to_frame(obj, arg)
        xcol = "eigenvalue" if "eigenvalue" in df.columns else "grid"
        require_columns(df, [xcol, "density"], arg)
        grid, density = df[xcol].to_numpy(float), df["density"].to_numpy(float)
    if grid.ndim != 1 or grid.shape != density.shape or grid.size < 2:
        raise UserInputError(f"{arg}: grid and density must be 1-D arrays of the same length >= 2")
    require_finite(grid, f"{arg} grid")
    require_finite(density, f"{arg} density")
    if np.any(density < 0):
        raise UserInputError(f"{arg}: a spectral density cannot be negative")
    return grid, density


def _eigen_array(obj: Any, arg: str) -> np.ndarray:
    values = obj.eigenvalues if hasattr(obj, "eigenvalues") else obj
    values = np.sort(np.atleast_1d(np.asarray(values, float)))[::-1]
    return require_finite(values, arg)


def _as_mapping(obj: Any, label: str | None) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return {str(k): v for k, v in obj.items()}
    return {label or "": obj}


@data_argument("density")
def plot_density(data: Any, *, eigenvalues: Any = None, top_k: int | None = None, label: str | None = None,
                 floor: float = 1e-6, ax: Axes | None = None, **kwargs: Any) -> Axes:
    """Eigenvalue density on a log density axis with the top-k eigenvalues marked.

    ``data`` (formerly ``density=``): a ``DensityResult`` (``.grid``, ``.density``), a DataFrame with
    columns ``eigenvalue, density``, or a mapping ``{optimizer: either}`` to overlay several models.
    ``eigenvalues``: an ``EigenResult``, an array, or a mapping with the same keys; each is marked
    by a triangle above the curve (at most ``top_k`` per model). Densities below ``floor`` times the
    peak are clipped to it, so the log axis shows the bulk and the outliers without empty decades.
    ``kwargs`` go to ``ax.plot`` for every density curve.
    """
    if not 0 < floor < 1:
        raise UserInputError(f"floor must be in (0, 1), got {floor}")
    if top_k is not None and top_k < 1:
        raise UserInputError(f"top_k must be >= 1, got {top_k}")
    curves = _as_mapping(data, label)
    marks = _as_mapping(eigenvalues, label) if eigenvalues is not None else {}
    unknown = set(marks) - set(curves)
    if unknown:
        raise UserInputError(f"eigenvalues has keys {sorted(unknown)} with no density; keys are {sorted(curves)}")
    if ax is None:
        _, ax = new_figure()
    colors = series_colors(curves)
    peak = 0.0
    for name, obj in curves.items():
        grid, dens = _density_arrays(obj, f"data[{name!r}]" if name else "data")
        peak = max(peak, float(dens.max()))
        dens = np.where(dens > 0, dens, np.nan)  # log axis: zero density lies below the floor
        ax.plot(grid, dens, **{"color": colors[name], "label": optimizer_label(name) or None, **kwargs})
        ax.fill_between(grid, floor * np.nanmax(dens), dens, where=np.isfinite(dens), color=colors[name],
                        alpha=0.12, linewidth=0)
    if not peak > 0:
        raise UserInputError("density is zero everywhere: nothing to draw")
    ax.set_yscale("log")
    # Headroom above the peak keeps the eigenvalue markers clear of the curves.
    top_fraction = 0.82 - 0.04 * max(len(marks) - 1, 0)
    ax.set_ylim(floor * peak, floor * peak * (1.0 / floor) ** (1.0 / top_fraction))
    # Markers sit in a strip above the curves: x in data units, y in axes fraction.
    strip = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    shown = 0
    backends = set()
    for i, (name, obj) in enumerate(marks.items()):
        backends.add(str(getattr(obj, "settings", {}).get("backend", "sharpscope")))
        values = _eigen_array(obj, f"eigenvalues[{name!r}]" if name else "eigenvalues")
        if top_k is not None:
            values = values[:top_k]
        y = 0.96 - 0.045 * i
        ax.plot(values, np.full(values.shape, y), linestyle="none", marker="v", markersize=3.5,
                color=colors[name], transform=strip, clip_on=False)
        shown = max(shown, values.size)
    if marks:
        ax.plot([], [], linestyle="none", marker="v", color="0.3", markersize=3.5,
                label=f"top-{shown} eigenvalues ({_eigen_method(backends)})")
    ax.set_xlabel(r"Eigenvalue $\lambda$")
    ax.set_ylabel("Spectral density")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        labels = [short_label(label) for label in labels]
        ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.01), borderaxespad=0.0,
                  ncols=legend_columns(labels, ax.figure.get_figwidth()), handlelength=1.5, columnspacing=1.2)
    return ax


def _trajectory_frame(data: Any, arg: str) -> pd.DataFrame:
    df = labelled_frame(data, arg, "optimizer")
    if "optimizer" not in df.columns:
        df["optimizer"] = ""
    return df


def plot_curvature_trajectory(data: Any, quantity: str = "lambda_max", *, x: str = "epoch",
                              lr: float | Mapping[str, float] | None = None, log: bool = False,
                              ax: Axes | None = None, legend: bool = True, **kwargs: Any) -> Axes:
    """``quantity`` (``lambda_max`` or ``trace``) across checkpoints, one line per optimizer.

    ``data``: a tidy DataFrame with columns ``x`` (e.g. ``epoch`` or ``step``), ``quantity``, and
    optionally ``optimizer`` and ``{quantity}_stderr`` (drawn as a +-1 s.e. band); or a mapping
    ``{optimizer: DataFrame}``. ``lr`` draws the stability threshold 2/lr (one learning rate, or one
    per optimizer in its colour); it is only drawn for ``lambda_max``. ``kwargs`` go to ``ax.plot``.
    """
    if quantity not in _QUANTITY_LABEL:
        raise UserInputError(f"quantity must be one of {list(_QUANTITY_LABEL)}, got {quantity!r}")
    df = _trajectory_frame(data, "data")
    column = _column(df, quantity)
    require_columns(df, [x, column], "data")
    require_finite(df[column].to_numpy(float), f"data[{column!r}]")
    if ax is None:
        _, ax = new_figure()
    optimizers = ordered_unique(df["optimizer"])
    colors = series_colors(optimizers)
    err = f"{column}_stderr"
    for i, name in enumerate(optimizers):
        run = df[df["optimizer"] == name].sort_values(x)
        xs, ys = run[x].to_numpy(float), run[column].to_numpy(float)
        ax.plot(xs, ys, **{"color": colors[name], "marker": optimizer_marker(name, i),
                           "label": optimizer_label(name) or None, **kwargs})
        if err in run.columns:
            se = run[err].to_numpy(float)
            ax.fill_between(xs, ys - se, ys + se, color=colors[name], alpha=0.18, linewidth=0)
    if lr is not None and quantity in ("lambda_max", "top_eigenvalue"):
        rates = lr if isinstance(lr, Mapping) else {"": lr}
        top = float(df[column].max())
        off_scale = []
        for name, rate in rates.items():
            if not rate > 0:
                raise UserInputError(f"lr must be positive, got {rate}")
            label = rf"$2/\eta$ ({optimizer_label(name)})" if name else r"$2/\eta$"
            if 2.0 / rate > 3.0 * top > 0:  # far above the data: say so instead of flattening the curves
                off_scale.append(f"{label} = {2.0 / rate:.3g}")
                continue
            color = series_colors([name])[name] if name else "0.35"
            ax.axhline(2.0 / rate, color=color, linestyle=":", linewidth=1.0, label=label)
        for text in off_scale:  # a legend entry, so it never covers a curve
            ax.plot([], [], linestyle="none", label=f"{text} (off scale)")
    if log:
        ax.set_yscale("log")
    if x in ("epoch", "step"):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel(x.capitalize())
    ax.set_ylabel(_QUANTITY_LABEL[quantity])
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return ax


def plot_curvature_trajectories(data: Any, *, x: str = "epoch", lr: float | Mapping[str, float] | None = None,
                                fig: Figure | None = None, **kwargs: Any) -> Figure:
    """Two panels: top eigenvalue (with 2/lr) and trace over training, with one shared legend.

    ``data`` as in :func:`plot_curvature_trajectory`; ``kwargs`` go to ``ax.plot``.
    """
    df = _trajectory_frame(data, "data")
    fig, axes = figure_axes(fig, 0.42, ncols=2)
    plot_curvature_trajectory(df, "lambda_max", x=x, lr=lr, ax=axes[0], legend=False, **kwargs)
    plot_curvature_trajectory(df, "trace", x=x, ax=axes[1], legend=False, **kwargs)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(handles), 6))
    return fig


def plot_layer_curvature(data: Any, value: str | None = None, *, hue: str = "optimizer", log: bool | None = None,
                         matrices_only: bool = False, ax: Axes | None = None, **kwargs: Any) -> Axes:
    """Per-tensor curvature as a dot plot: tensors top to bottom in model order, grouped by block
    (alternating bands, the block named at the right), one dot per model.

    ``data``: the ``layer_curvature`` result or its table (one row per parameter tensor: ``layer``,
    ``top_eigenvalue``, ``trace``, ``trace_stderr``, ...) or a mapping ``{optimizer: either}`` to
    compare models. ``value`` defaults to ``top_eigenvalue`` (the top eigenvalue of the tensor's
    diagonal Hessian block); ``trace`` is drawn with its standard error. Dots, not bars: on a log
    axis a bar's length would depend on an arbitrary left limit. ``log`` (default: on when all values
    are positive and span more than two decades). ``matrices_only`` leaves out the 1-D tensors
    (biases, normalisation scales; known from the ``shape`` column, else from the name) and says how
    many in the axis label. ``kwargs`` go to ``ax.plot``.
    """
    df = labelled_frame(data, "data", "optimizer")
    if value is None:
        value = next((c for c in ("top_eigenvalue", "lambda_max", "trace") if c in df.columns), "top_eigenvalue")
    require_columns(df, ["layer", value], "data")
    dropped = 0
    if matrices_only:
        keep = ~df.apply(_is_vector_tensor, axis=1)
        dropped = df.loc[~keep, "layer"].nunique()
        df = df[keep]
        require_columns(df, ["layer"], "data (matrices only)")
    values = require_finite(df[value].to_numpy(float), f"data[{value!r}]")
    if log is None:
        log = bool(np.all(values > 0) and values.max() / values.min() > 100)
    if log and np.any(values <= 0):
        raise UserInputError(f"log=True needs positive {value!r} values; use log=False")
    label = {"top_eigenvalue": r"Top eigenvalue of the block $\lambda_{\max}(H_{ll})$",
             "trace": r"Trace of the block $\mathrm{tr}(H_{ll})$"}.get(value, value.replace("_", " "))
    if dropped:
        label += f"  ({dropped} 1-D tensors, biases and norms, left out)"
    layers = ordered_unique(df["layer"])
    series = ordered_unique(df[hue]) if hue in df.columns else [None]
    ax = bar_axes(len(layers), 1, ax)
    _block_bands(ax, layers)
    _layer_dots(ax, df, layers, series, hue, value, **kwargs)
    finish_layer_axis(ax, layers, label, log=log, legend=len(series) > 1)
    return ax


def _is_vector_tensor(row: pd.Series) -> bool:
    """A bias or a normalisation scale: one dimension (``shape`` without ``x``), else told by name."""
    shape = row.get("shape")
    if isinstance(shape, str) and shape:
        return "x" not in shape
    name = str(row["layer"])
    return name.endswith(".bias") or any(k in name for k in ("bn", "norm", ".ln"))


def layer_block(name: str) -> str:
    """The block a tensor belongs to: its module path without the last module and the parameter
    (``layer1.0.conv1.weight`` -> ``layer1.0``; ``net.0.weight`` -> ``net``; ``fc.weight`` -> ``fc``)."""
    parts = short_layer_name(name).replace(" (bias)", "").split(".")
    return ".".join(parts[:-1]) or parts[0]


def _block_bands(ax: Axes, layers: list[str]) -> None:
    blocks = [layer_block(n) for n in layers]
    start = 0
    shade = False
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[start]:
            if shade:
                ax.axhspan(start - 0.5, i - 0.5, color="0.94", linewidth=0, zorder=0)
            if len(set(blocks)) > 1 and i - start > 0:
                ax.text(1.01, (start + i - 1) / 2, blocks[start], transform=transforms.blended_transform_factory(
                    ax.transAxes, ax.transData), fontsize="x-small", va="center", color="0.35")
            shade, start = not shade, i


def _layer_dots(ax: Axes, df: pd.DataFrame, layers: list[str], series: list[Any], hue: str, value: str,
                **kwargs: Any) -> None:
    rows = {c: i for i, c in enumerate(layers)}
    colors = series_colors([s for s in series if s is not None]) if series != [None] else {}
    stderr = f"{value}_stderr"
    for j, s in enumerate(series):
        part = df if s is None else df[df[hue] == s]
        offset = (j - (len(series) - 1) / 2) * min(0.18, 0.6 / max(len(series), 1))
        y = np.array([rows[c] for c in part["layer"]], dtype=float) + offset
        x = part[value].to_numpy(float)
        color = colors.get(s, "#0072B2")
        if stderr in part.columns:
            ax.errorbar(x, y, xerr=part[stderr].to_numpy(float), fmt="none", ecolor=color, elinewidth=0.6)
        ax.plot(x, y, **{"linestyle": "none", "marker": optimizer_marker(str(s), j) if s is not None else "o",
                         "markersize": 3.5, "color": color, "label": optimizer_label(s) if s is not None else None,
                         **kwargs})


def _eigen_method(backends: set[str]) -> str:
    """How the marked eigenvalues were computed: PyHessian iterates powers, sharpscope runs Lanczos."""
    names = {"pyhessian": "PyHessian power iteration"}
    return " / ".join(sorted(names.get(b, "Lanczos") for b in backends))


_SUMMARY_LABEL = {
    "lambda_max": r"$\lambda_{\max}$",
    "trace": r"$\mathrm{tr}(H)$",
    "sharpness_worst": "Worst-case sharpness",
    "sharpness_average": "Average sharpness",
    "test_acc": "Test accuracy (%)",
}


@data_argument("table")
def plot_sharpness_summary(data: Any, quantities: Any = ("lambda_max", "trace", "sharpness_worst",
                                                           "sharpness_average"), *,
                           label: str = "run", fig: Figure | None = None, **kwargs: Any) -> Figure:
    """One small panel per quantity, one bar per model in its optimizer colour (+-1 s.e. where known);
    a model without a value for a quantity is marked "n/a" in that panel, not drawn as a zero bar.

    ``data`` (formerly ``table=``): one row per model, with a ``label`` column (default ``run``; an
    optimizer name keeps its palette colour) and numeric columns named in ``quantities``; a column
    ``<q>_stderr``, when present, is drawn as an error bar. Quantities absent from ``data`` are
    skipped. ``kwargs`` go to ``ax.bar``.
    """
    df = to_frame(data, "data")
    require_columns(df, [label], "data")
    shown = [q for q in quantities if q in df.columns and df[q].notna().any()]
    if not shown:
        raise UserInputError(f"data has none of the columns {list(quantities)}; it has {list(df.columns)}")
    names = [str(n) for n in df[label]]
    # colour by optimizer (a run named "seed3" of SAM is SAM's colour), not by run name
    by = [str(o) for o in df["optimizer"].fillna(df[label])] if "optimizer" in df.columns else names
    palette = series_colors(by)
    fig, axes = figure_axes(fig, 0.36 if len(shown) > 2 else 0.5, ncols=len(shown))
    positions = np.arange(len(names))
    for ax, q in zip(axes, shown):
        values = df[q].to_numpy(float)
        err = df[f"{q}_stderr"].to_numpy(float) if f"{q}_stderr" in df.columns else None
        if err is not None and not np.isfinite(err).any():
            err = None
        measured = np.isfinite(values)  # a run without this measure gets no bar (never a zero bar)
        ax.bar(positions[measured], values[measured], **{
            "width": 0.7, "color": [palette[b] for b, m in zip(by, measured) if m], "linewidth": 0,
            "yerr": None if err is None else np.nan_to_num(err[measured]),
            "error_kw": {"elinewidth": 0.6, "capsize": 1.5, "ecolor": "0.25"}, **kwargs})
        for pos in positions[~measured]:
            ax.text(pos, 0, "n/a", ha="center", va="bottom", fontsize="x-small", color="0.45")
        ax.set_xticks(positions, [short_label(optimizer_label(n), 24) for n in names], rotation=0 if len(names) <= 4 else 45,
                      ha="center" if len(names) <= 4 else "right", rotation_mode="anchor")
        ax.tick_params(axis="x", length=0)
        ax.grid(axis="x", visible=False)
        ax.set_title(_SUMMARY_LABEL.get(q, q.replace("_", " ")), fontsize="medium")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    return fig
