"""Loss-landscape figures: 2-D contours (line and filled), 3-D surfaces, 1-D slices, interpolations.

Inputs are :class:`~sharpscope.analysis.landscape.Landscape` results (``landscape_1d``,
``landscape_2d``, ``interpolate``), loaded ones (``Landscape.load``), or their tidy
``to_dataframe()`` tables: columns ``x`` (and ``y`` for 2-D) or ``alpha``, then ``loss``,
``accuracy`` and optionally ``done`` (points not yet computed in a resumable slice are left out).

Conventions follow Li et al., NeurIPS 2018 ("Visualizing the loss landscape of neural nets"):
the trained weights sit at the origin, directions are filter-normalised, contour levels are shared
when several models are compared. Loss spans orders of magnitude away from the minimum, so contour
levels are log-spaced by default; accuracies stored as fractions are drawn in percent.

Every function takes its landscapes as ``data`` and passes further keyword arguments on to the
matplotlib call that draws them (``contour``/``contourf``, ``plot_surface``, ``plot``), e.g.
``plot_landscape_1d(res, linewidth=2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from ..errors import UserInputError
from ._data import data_argument, require_columns, to_frame
from .style import figure_axes, figure_width, new_figure, optimizer_label, optimizer_marker, series_colors

__all__ = [
    "plot_contour",
    "plot_contours",
    "plot_surface",
    "plot_landscape_1d",
    "plot_landscape_1d_panels",
    "plot_interpolation",
    "plot_interpolations",
    "interpolation_endpoints",
]

_METRIC_LABEL = {"loss": "Loss", "accuracy": "Accuracy (%)"}


def _metric_label(metric: str) -> str:
    return _METRIC_LABEL.get(metric, metric.replace("_", " ").capitalize())


def _scale(metric: str) -> float:
    return 100.0 if metric == "accuracy" else 1.0


def _settings(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "settings", {}) or {})


def _frame(obj: Any, arg: str) -> pd.DataFrame:
    df = to_frame(obj, arg)
    if "done" in df.columns:
        df = df[df["done"].astype(bool)]
    if df.empty:
        raise UserInputError(f"{arg} has no computed points: nothing to draw")
    return df


def _coordinate(df: pd.DataFrame, arg: str) -> str:
    for name in ("alpha", "x"):
        if name in df.columns:
            return name
    raise UserInputError(f"{arg} has no coordinate column 'x' or 'alpha'; it has {list(df.columns)}")


def _grid(obj: Any, metric: str, arg: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, Z) with ``Z[j, i]`` the value at ``x[i], y[j]`` (matplotlib's contour orientation)."""
    df = _frame(obj, arg)
    require_columns(df, ["x", "y", metric], arg)
    table = df.pivot_table(index="y", columns="x", values=metric, aggfunc="first", dropna=False)
    x, y = table.columns.to_numpy(float), table.index.to_numpy(float)
    if x.size < 2 or y.size < 2:
        raise UserInputError(f"{arg} needs at least a 2 x 2 grid for a contour; it has {x.size} x {y.size}")
    z = table.to_numpy(float) * _scale(metric)
    if np.isnan(z).all():
        raise UserInputError(f"{arg}: {metric} is NaN everywhere: nothing to draw")
    return x, y, z


def _axis_label(settings: Mapping[str, Any], k: int, symbol: str) -> str:
    dirs = settings.get("directions") or []
    norm = dirs[k].get("normalization") if k < len(dirs) and isinstance(dirs[k], Mapping) else None
    kind = {"filter": "filter-normalized", "layer": "layer-normalized", "model": "model-normalized"}.get(norm)
    return rf"Direction $d_{k + 1}$ ({kind})" if kind else rf"Coordinate ${symbol}$ along $d_{k + 1}$"


def panel_width() -> float:
    """Width of a square panel: the whole column in a narrow style, half the text width otherwise."""
    width = figure_width()
    return width if width <= 3.6 else width / 2


def _levels(z: np.ndarray, levels: int | Sequence[float], log: bool) -> np.ndarray:
    if not isinstance(levels, (int, np.integer)):
        out = np.asarray(levels, float)
        if out.ndim != 1 or out.size < 2 or np.any(np.diff(out) <= 0):
            raise UserInputError("levels must be an int >= 2 or an increasing sequence of >= 2 values")
        return out
    if levels < 2:
        raise UserInputError(f"levels must be >= 2, got {levels}")
    lo, hi = np.nanmin(z), np.nanmax(z)
    if log:
        return np.geomspace(lo, hi, int(levels))
    return np.linspace(lo, hi, int(levels))


def _use_log(z: np.ndarray, metric: str, log: bool | None) -> bool:
    positive = bool(np.nanmin(z) > 0)
    if log is None:
        return metric == "loss" and positive and np.nanmax(z) / np.nanmin(z) > 10
    if log and not positive:
        raise UserInputError(f"log=True needs a positive {metric}; its minimum is {np.nanmin(z):.3g}")
    return bool(log)


def _level_format(value: float) -> str:
    return f"{value:.2g}" if abs(value) < 100 else f"{value:.0f}"


@data_argument("landscape")
def plot_contour(data: Any, metric: str = "loss", *, filled: bool = False,
                 levels: int | Sequence[float] = 12, log: bool | None = None, label_levels: bool = True,
                 mark_origin: bool = True, colorbar: bool = True, cmap: str = "viridis",
                 ax: Axes | None = None, **kwargs: Any) -> Axes:
    """2-D contour of ``metric`` around the trained weights, levels labelled (or filled with a colour bar).

    ``data``: a 2-D ``Landscape`` or a DataFrame with columns ``x, y, <metric>`` (formerly
    ``landscape=``). ``levels``: a number of levels (log-spaced from the minimum when ``log``) or the
    level values themselves (pass the same to several plots to compare models). ``log`` defaults to
    on for a positive loss spanning more than a decade. The origin (the trained weights) is marked by
    a star. ``kwargs`` go to ``ax.contour`` (``ax.contourf`` when ``filled``); ``colors=`` replaces
    the colour map.
    """
    x, y, z = _grid(data, metric, "data")
    use_log = _use_log(z, metric, log)
    lv = _levels(z, levels, use_log)
    if ax is None:
        w = panel_width()
        # a square plot area plus room for tick labels, axis labels and the colour bar
        side = w - 0.55 - (0.6 if filled and colorbar else 0.0)
        _, ax = new_figure(aspect=(side + 0.45) / w, width=w)
    norm = LogNorm(lv[0], lv[-1]) if use_log else Normalize(lv[0], lv[-1])
    colours = {} if "colors" in kwargs else {"cmap": cmap, "norm": norm}  # matplotlib takes one of the two
    if filled:
        covered = lv[0] <= np.nanmin(z) and lv[-1] >= np.nanmax(z)
        cf = ax.contourf(x, y, z, levels=lv, **{**colours, "extend": "neither" if covered else "both", **kwargs})
        cs = ax.contour(x, y, z, levels=lv, colors="white", linewidths=0.35, alpha=0.6)
        if colorbar:
            _colorbar(ax.figure, cf, ax, lv, metric, use_log)
    else:
        cs = ax.contour(x, y, z, levels=lv, **{**colours, "linewidths": 0.8, **kwargs})
    if label_levels and not filled:
        ax.clabel(cs, cs.levels[::2], inline=True, fontsize="x-small", fmt=_level_format, inline_spacing=2)
    if mark_origin and x.min() <= 0 <= x.max() and y.min() <= 0 <= y.max():
        ax.plot(0, 0, marker="*", color="white" if filled else "black", markeredgecolor="black",
                markeredgewidth=0.4, markersize=6, linestyle="none", zorder=5)
    settings = _settings(data)
    ax.set_xlabel(_axis_label(settings, 0, "x"))
    ax.set_ylabel(_axis_label(settings, 1, "y"))
    ax.set_aspect("equal" if np.isclose(np.ptp(x), np.ptp(y)) else "auto")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(False)
    return ax


def _colorbar(fig: Figure, mappable: Any, ax: Any, levels: np.ndarray, metric: str, log: bool) -> None:
    cb = fig.colorbar(mappable, ax=ax, pad=0.03, aspect=30, fraction=0.06)
    cb.set_label(_metric_label(metric))
    cb.set_ticks(levels[::2])
    cb.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _level_format(v)))
    cb.ax.yaxis.set_minor_locator(ticker.NullLocator())
    cb.outline.set_linewidth(0.5)
    cb.ax.tick_params(labelsize="small")


@data_argument("landscapes")
def plot_contours(data: Mapping[str, Any], metric: str = "loss", *, filled: bool = True,
                  levels: int | Sequence[float] = 12, log: bool | None = None, cmap: str = "viridis",
                  fig: Figure | None = None, **kwargs: Any) -> Figure:
    """Small multiples, one 2-D contour per model, with the same levels and one colour bar.

    ``data``: ``{optimizer: Landscape or DataFrame}`` (formerly ``landscapes=``). Shared levels make
    the panels comparable: equal colours mean equal loss in every panel. ``kwargs`` go to every
    panel's :func:`plot_contour`, hence to matplotlib's ``contourf``/``contour``.
    """
    if not isinstance(data, Mapping) or not data:
        raise UserInputError("data must be a non-empty mapping {label: 2-D Landscape}")
    grids = {k: _grid(v, metric, f"data[{k!r}]") for k, v in data.items()}
    z_all = np.concatenate([g[2].ravel() for g in grids.values()])
    use_log = _use_log(z_all, metric, log)
    lv = _levels(z_all[np.isfinite(z_all)], levels, use_log)
    n = len(grids)
    width = figure_width()
    side = (width - 0.55 - (0.65 if filled else 0.0)) / n - 0.08
    fig, axes = figure_axes(fig, (side + 0.6) / width, ncols=n, width=width, sharex=True, sharey=True)
    for ax, (name, obj) in zip(axes, data.items()):
        plot_contour(obj, metric, filled=filled, levels=lv, log=use_log, colorbar=False, cmap=cmap, ax=ax,
                     **kwargs)
        ax.set_title(optimizer_label(name))
        # edge ticks of neighbouring panels would run into each other
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4, steps=[1, 2, 2.5, 5, 10], prune="both"))
        if ax is not axes[0]:
            ax.set_ylabel("")
    if n > 1:
        xlabel = axes[0].get_xlabel()
        for ax in axes:
            ax.set_xlabel("")
        fig.supxlabel(xlabel, fontsize=axes[0].xaxis.label.get_fontsize())
    if filled:
        norm = LogNorm(lv[0], lv[-1]) if use_log else Normalize(lv[0], lv[-1])
        _colorbar(fig, ScalarMappable(norm=norm, cmap=cmap), list(axes), lv, metric, use_log)
    return fig


@data_argument("landscape")
def plot_surface(data: Any, metric: str = "loss", *, log: bool = False, cmap: str = "viridis",
                 elev: float = 32.0, azim: float = -55.0, title: str | None = None, ax: Axes | None = None,
                 zlim: tuple[float, float] | None = None, **kwargs: Any) -> Axes:
    """3-D surface of ``metric`` over the 2-D slice; ``log`` draws log10 of it (ticks as powers of ten).

    ``zlim`` (in the metric's units) fixes the z range and the colour scale, so that surfaces of
    several models drawn with the same ``zlim`` can be compared (see :func:`plot_surfaces`); by
    default each surface spans its own range.

    ``data``: a 2-D ``Landscape`` or a DataFrame ``x, y, <metric>`` (formerly ``landscape=``).
    Matplotlib's 3-D axes do not support log scales, so the logarithm is applied to the values and
    the z tick labels are written as the original values. ``title`` (e.g. the optimizer) is set
    above the surface; ``kwargs`` go to ``ax.plot_surface``. The demo's ``surface_<run>`` figure is
    ``plot_surface(landscape, log=True, title=optimizer_label(run))``.
    """
    x, y, z = _grid(data, metric, "data")
    if log:
        if not np.nanmin(z) > 0:
            raise UserInputError(f"log=True needs a positive {metric}; its minimum is {np.nanmin(z):.3g}")
        z = np.log10(z)
    limits = None
    if zlim is not None:
        limits = tuple(np.log10(v) if log else float(v) for v in zlim)
        kwargs = {"vmin": limits[0], "vmax": limits[1], **kwargs}
    if ax is None:
        w = panel_width()
        _, ax = new_figure(aspect=0.85, width=w, subplot_kw={"projection": "3d"})
    elif getattr(ax, "name", "") != "3d":
        raise UserInputError("ax must be a 3-D Axes: fig.add_subplot(projection='3d')")
    xx, yy = np.meshgrid(x, y)
    ax.plot_surface(xx, yy, z, **{"cmap": cmap, "linewidth": 0.15, "edgecolor": (1, 1, 1, 0.35),
                                  "antialiased": True, "rcount": min(len(y), 60), "ccount": min(len(x), 60),
                                  **kwargs})
    ax.view_init(elev=elev, azim=azim)
    if limits is not None:
        ax.set_zlim(*limits)
    if title is not None:
        ax.set_title(title, pad=0)
    settings = _settings(data)
    ax.set_xlabel(r"$d_1$" if settings.get("directions") else "x", labelpad=-6)
    ax.set_ylabel(r"$d_2$" if settings.get("directions") else "y", labelpad=-6)
    ax.set_zlabel(_metric_label(metric), labelpad=-4)
    ax.tick_params(axis="both", pad=-3, labelsize="x-small")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(4, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(4, steps=[1, 2, 2.5, 5, 10]))
    ax.tick_params(axis="z", pad=-1)
    if log:
        ax.zaxis.set_major_locator(ticker.MaxNLocator(4, integer=np.ptp(z) >= 2))
        ax.zaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _level_format(10.0**v)))
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.pane.set_facecolor((1, 1, 1, 0))
        axis.pane.set_edgecolor("0.85")
        axis._axinfo["grid"]["linewidth"] = 0.3
        axis._axinfo["grid"]["color"] = (0.85, 0.85, 0.85, 1)
    ax.set_box_aspect(None, zoom=0.8)
    return ax


def surface_limits(data: Mapping[str, Any], metric: str = "loss") -> tuple[float, float]:
    """The smallest and largest ``metric`` over every 2-D slice of ``data``: one z range for all."""
    values = np.concatenate([np.ravel(_grid(obj, metric, f"data[{k!r}]")[2]) for k, obj in data.items()])
    return float(np.nanmin(values)), float(np.nanmax(values))


def plot_surfaces(data: Mapping[str, Any], metric: str = "loss", *, log: bool = True, fig: Figure | None = None,
                  **kwargs: Any) -> Figure:
    """Small multiples of :func:`plot_surface`, one per model, on ONE z range and colour scale
    (:func:`surface_limits`), so equal heights and colours mean equal losses across panels.
    ``kwargs`` go to each :func:`plot_surface`."""
    if not isinstance(data, Mapping) or not data:
        raise UserInputError("data must be a non-empty mapping {label: 2-D Landscape}")
    zlim = surface_limits(data, metric)
    n = len(data)
    width = figure_width()
    if fig is None:
        fig, _ = new_figure(aspect=1.0 / n + 0.06, width=width, ncols=n, subplot_kw={"projection": "3d"})
        axes = fig.axes
    else:
        axes = [fig.add_subplot(1, n, i + 1, projection="3d") for i in range(n)]
    for ax, (name, obj) in zip(axes, data.items()):
        plot_surface(obj, metric, log=log, title=optimizer_label(name), ax=ax, zlim=zlim, **kwargs)
        ax.set_zlabel("")  # named once in the title: a 3-D z label falls outside the last panel
    fig.suptitle(f"z and colour: {_metric_label(metric).lower()}{' (log scale)' if log else ''}, one range for "
                 f"all panels", fontsize="small")
    return fig


def _curves(data: Any) -> dict[str, Any]:
    if isinstance(data, Mapping):
        if not data:
            raise UserInputError("data is an empty mapping: nothing to draw")
        return {str(k): v for k, v in data.items()}
    if isinstance(data, pd.DataFrame) and "optimizer" in data.columns:
        return {str(k): g for k, g in data.groupby("optimizer", sort=False)}
    return {"": data}


@data_argument("landscapes")
def plot_landscape_1d(data: Any, metric: str = "loss", *, log: bool = False, ax: Axes | None = None,
                      legend: bool = True, **kwargs: Any) -> Axes:
    """``metric`` along 1-D slices (``landscape_1d``) or interpolations, several overlaid.

    ``data`` (formerly ``landscapes=``): one ``Landscape``/DataFrame, a mapping ``{label: Landscape}``
    (an optimizer label keeps its palette colour), or a DataFrame with an ``optimizer`` column.
    ``kwargs`` go to ``ax.plot`` for every curve (``color=`` overrides the palette).
    """
    curves = _curves(data)
    if ax is None:
        _, ax = new_figure()
    colors = series_colors(curves)
    coord = "x"
    for i, (name, obj) in enumerate(curves.items()):
        arg = f"data[{name!r}]" if name else "data"
        df = _frame(obj, arg)
        coord = _coordinate(df, arg)
        require_columns(df, [metric], arg)
        df = df.sort_values(coord)
        xs, ys = df[coord].to_numpy(float), df[metric].to_numpy(float) * _scale(metric)
        ax.plot(xs, ys, **{"color": colors[name], "marker": optimizer_marker(name, i) if len(xs) <= 25 else None,
                           "markersize": 2.5, "label": optimizer_label(name) or None, **kwargs})
    if log:
        ax.set_yscale("log")
    first = next(iter(curves.values()))
    if coord == "alpha":
        ax.set_xlabel(r"Interpolation coefficient $\alpha$")
    else:
        ax.set_xlabel(_axis_label(_settings(first), 0, "x"))
    ax.set_ylabel(_metric_label(metric))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return ax


@data_argument("landscapes")
def plot_landscape_1d_panels(data: Any, metrics: Sequence[str] = ("loss", "accuracy"), *,
                             log_loss: bool = False, fig: Figure | None = None, **kwargs: Any) -> Figure:
    """One :func:`plot_landscape_1d` panel per metric side by side, one legend above them.

    ``data`` as in :func:`plot_landscape_1d` (formerly ``landscapes=``); ``kwargs`` go to ``ax.plot``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not metrics:
        raise UserInputError("metrics must name at least one metric, e.g. ('loss', 'accuracy')")
    fig, axes = figure_axes(fig, 0.42 if len(metrics) > 1 else 0.62, ncols=len(metrics), sharex=True)
    for ax, metric in zip(axes, metrics):
        plot_landscape_1d(data, metric, log=log_loss and metric == "loss", ax=ax, legend=False, **kwargs)
    if len(axes) > 1:  # one x label under all panels: long direction labels do not fit a narrow panel
        xlabel = axes[0].get_xlabel()
        for ax in axes:
            ax.set_xlabel("")
        fig.supxlabel(xlabel, fontsize=axes[0].xaxis.label.get_fontsize())
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(handles), 6))
    return fig


def interpolation_endpoints(data: Any) -> tuple[str, str]:
    """Display names of an interpolation's two models, read from its settings.

    ``sharpscope analyze`` stores ``model_a``/``model_b`` (optimizer, run, epoch) in the result; the
    names are their optimizers (``"SGD"``, ``"ZSharp"``), then run and epoch where the optimizers
    agree, and ``"A"``/``"B"`` when nothing is stored.
    """
    settings = _settings(data)
    ends = [settings.get(k) or {} for k in ("model_a", "model_b")]
    ends = [e if isinstance(e, Mapping) else {} for e in ends]
    labels = [optimizer_label(e.get("optimizer") or e.get("run") or k) for e, k in zip(ends, "AB")]
    if labels[0] == labels[1]:  # two checkpoints of one optimizer: say which
        labels = [f"{lab} ({e['run']}, ep. {e['epoch']})" if "run" in e and "epoch" in e else lab
                  for lab, e in zip(labels, ends)]
        if labels[0] == labels[1]:
            labels = [f"{lab} [{k}]" for lab, k in zip(labels, "AB")]
    return labels[0], labels[1]


@data_argument("landscapes")
def plot_interpolation(data: Any, metric: str = "loss", *, endpoints: Sequence[str] | None = None,
                       log: bool = False, ax: Axes | None = None, legend: bool = True, **kwargs: Any) -> Axes:
    """Loss (or accuracy) along ``(1 - alpha) w_A + alpha w_B`` (Goodfellow et al., ICLR 2015).

    ``data``: an ``interpolate`` result or a table ``alpha, <metric>`` (formerly ``landscapes=``).
    The end points are marked at ``alpha = 0`` and ``1`` with their names: ``endpoints``, or by
    default :func:`interpolation_endpoints` of ``data``. The extrapolated parts (``alpha`` outside
    [0, 1]) are shaded. ``kwargs`` go to ``ax.plot``.
    """
    if endpoints is None:
        endpoints = interpolation_endpoints(data)
    if len(endpoints) != 2:
        raise UserInputError(f"endpoints must name the two models, got {endpoints!r}")
    ax = plot_landscape_1d(data, metric, log=log, ax=ax, legend=legend, **kwargs)
    lo, hi = ax.get_xlim()
    for a in (0.0, 1.0):
        ax.axvline(a, color="0.55", linewidth=0.6, linestyle=":", zorder=0)
    if lo < 0:
        ax.axvspan(lo, 0.0, color="0.93", zorder=-1, linewidth=0)
    if hi > 1:
        ax.axvspan(1.0, hi, color="0.93", zorder=-1, linewidth=0)
    ax.set_xlim(lo, hi)
    top = ax.secondary_xaxis("top")
    top.set_xticks([0.0, 1.0], [str(endpoints[0]), str(endpoints[1])])
    top.tick_params(length=0, pad=1.5)
    top.spines["top"].set_visible(False)
    return ax


#: Accuracy axes span at least this many points: one example in a thousand must not look like a cliff.
MIN_ACCURACY_SPAN = 2.0


def _min_span(ax: Axes, span: float, top: float) -> None:
    """Widen the y range of ``ax`` to ``span`` around its centre, not past ``top`` (plus a margin)."""
    lo, hi = ax.get_ylim()
    if hi - lo >= span:
        return
    margin = 0.05 * span
    hi = min((lo + hi + span) / 2, top + margin)
    ax.set_ylim(hi - span, hi)


@data_argument("landscapes")
def plot_interpolations(data: Any, metrics: Sequence[str] = ("loss", "accuracy"), *,
                        endpoints: Mapping[str, Sequence[str]] | None = None, fig: Figure | None = None,
                        **kwargs: Any) -> Figure:
    """One row per pair of models, one :func:`plot_interpolation` panel per metric (the demo's figure).

    ``data``: ``{name: interpolate result}`` (rows in this order) or one result. ``endpoints``:
    ``{name: (label_a, label_b)}`` for some rows (default: :func:`interpolation_endpoints`). An
    accuracy axis spans at least :data:`MIN_ACCURACY_SPAN` points, so a change of one example in a
    thousand does not look like a cliff; the panels of one metric share their y range, and the loss
    axis starts at 0. ``kwargs`` go to ``ax.plot``.
    """
    lines = {str(k): v for k, v in data.items()} if isinstance(data, Mapping) else {"": data}
    if not lines:
        raise UserInputError("data is an empty mapping: give at least one interpolation")
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not metrics:
        raise UserInputError("metrics must name at least one metric, e.g. ('loss', 'accuracy')")
    n = len(lines)
    fig, axes = figure_axes(fig, 0.36 * n + 0.06, nrows=n, ncols=len(metrics), sharex=True, squeeze=False)
    for row, (name, line) in zip(axes, lines.items()):
        ends = (endpoints or {}).get(name)
        for ax, metric in zip(row, metrics):
            plot_interpolation(line, metric, endpoints=ends, ax=ax, legend=False, **kwargs)
            if metric == "accuracy":
                _min_span(ax, MIN_ACCURACY_SPAN, top=100.0)
    for column, metric in zip(axes.T, metrics):
        _shared_y(column, from_zero=metric == "loss" and kwargs.get("log") is not True)
    for ax in np.ravel(axes[:-1]):
        ax.set_xlabel("")
    return fig


def _shared_y(column: np.ndarray, from_zero: bool) -> None:
    """One y range for the panels of one metric (rows compare); a loss axis starts at 0, so a rise
    from 0.0048 to 0.0056 reads as the small change it is, not as a cliff."""
    lows, highs = zip(*(ax.get_ylim() for ax in column))
    lo, hi = (0.0 if from_zero else min(lows)), max(highs)
    for ax in column:
        ax.set_ylim(lo, hi)
