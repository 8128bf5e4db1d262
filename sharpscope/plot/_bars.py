"""Grouped horizontal bars: one row per layer, one bar per series (optimizer) within the row.

Layer names are long (``layer3.2.conv2.weight``), so layers go on the y axis, in model order from
top to bottom, where the names stay horizontal and legible at column width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from ._data import ordered_unique
from .style import figure_width, new_figure, optimizer_label, series_colors


def short_layer_name(name: str) -> str:
    """``"module.layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``: drop wrappers and ``.weight``.

    A bias keeps its layer's short name with a suffix (``"layer1.0.conv1 (bias)"``), so weight and
    bias rows of one layer read alike.
    """
    name = str(name)
    for prefix in ("module.", "_orig_mod.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.endswith(".bias") and any(ch.isalpha() for ch in name[: -len(".bias")]):
        return f"{name[: -len('.bias')]} (bias)"
    short = name[: -len(".weight")] if name.endswith(".weight") else name
    # "0.weight" of an nn.Sequential says more than a bare "0"
    return short if any(ch.isalpha() for ch in short) else name


def bar_axes(n_rows: int, n_series: int, ax: Axes | None, width: float | None = None) -> Axes:
    """``ax``, or a new figure whose height fits ``n_rows`` groups of ``n_series`` bars."""
    if ax is not None:
        return ax
    width = figure_width() if width is None else width
    height = 0.55 + n_rows * (0.09 + 0.05 * n_series)
    _, ax = new_figure(aspect=min(max(height, 1.6), 9.0) / width, width=width)
    return ax


def finish_layer_axis(ax: Axes, layers: Sequence[str], xlabel: str, *, log: bool, legend: bool) -> None:
    """One row per layer, top to bottom, named shortly; the value axis labelled (log scale if asked)."""
    ax.set_yticks(range(len(layers)), [short_layer_name(c) for c in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="y", visible=False)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    if legend:
        ax.legend(loc="best")


def grouped_barh(df: pd.DataFrame, category: str, value: str, *, hue: str | None, ax: Axes | None,
                 log: bool = False, hatch_mask: pd.Series | None = None, xlabel: str = "",
                 order: Sequence[str] | None = None, error: str | None = None, single_color: str = "#0072B2",
                 **kwargs: Any) -> Axes:
    """Draw ``value`` per ``category`` (rows) and ``hue`` (bars within a row); return the Axes.

    ``hatch_mask`` marks rows to draw hatched (e.g. ZSharp's fallback layers); ``error`` names a
    column of symmetric error bars; ``single_color`` colours the bars when there is no ``hue``.
    ``kwargs`` go to ``ax.barh`` and win over these defaults (``color=`` colours every bar).
    """
    categories = list(order) if order is not None else ordered_unique(df[category])
    series = ordered_unique(df[hue]) if hue is not None and hue in df.columns else [None]
    ax = bar_axes(len(categories), len(series), ax)
    colors = series_colors([s for s in series if s is not None]) if series != [None] else {}
    height = 0.8 / len(series)
    rows = {c: i for i, c in enumerate(categories)}
    for j, s in enumerate(series):
        part = df if s is None else df[df[hue] == s]
        part = part[part[category].isin(rows)]
        y = np.array([rows[c] for c in part[category]], dtype=float) - 0.4 + height * (j + 0.5)
        xerr = part[error].to_numpy(float) if error is not None and error in part.columns else None
        bars = ax.barh(y, part[value].to_numpy(float), **{
            "height": height * 0.92, "color": colors.get(s, single_color), "xerr": xerr,
            "error_kw": {"elinewidth": 0.6, "capsize": 1.2, "ecolor": "0.25"},
            "label": optimizer_label(s) if s is not None else None, "linewidth": 0, **kwargs})
        if hatch_mask is not None:
            for bar, flag in zip(bars, hatch_mask.loc[part.index].to_numpy(bool)):
                if flag:
                    bar.set_hatch("////")
                    bar.set_edgecolor("white")
    finish_layer_axis(ax, categories, xlabel, log=log, legend=series != [None] and len(series) > 1)
    return ax
