"""Training curves: loss and accuracy per optimizer over epochs, from ``metrics.jsonl`` histories.

A history is one JSON object per epoch with ``epoch, step, lr, train_loss, train_acc, test_loss,
test_acc`` (the training loop's ``metrics.jsonl``). Accuracies given as fractions in [0, 1] are
drawn in percent. The functions take the histories as ``data`` and pass further keyword arguments
on to ``ax.plot``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import UserInputError
from ._data import choose, data_argument, labelled_frame, ordered_unique, require_columns, to_frame
from .style import figure_axes, legend_columns, new_figure, optimizer_label, optimizer_marker, series_colors

__all__ = ["read_history", "plot_training_curve", "plot_training_curves"]

_METRICS = {"loss": "Cross-entropy loss", "acc": "Accuracy (%)"}
_SPLIT_STYLE = {"train": "--", "test": "-"}


def read_history(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Alias of :func:`sharpscope.train.metrics.read_metrics`: ``metrics.jsonl`` (or a run folder
    holding one) as a DataFrame, one row per epoch (no rows for a run with no finished epoch)."""
    from ..train.metrics import read_metrics

    return read_metrics(path)


def _history_frame(obj: Any, arg: str) -> pd.DataFrame:
    if isinstance(obj, (str, os.PathLike)):
        return read_history(obj)
    if hasattr(obj, "history") and not isinstance(obj, pd.DataFrame):  # a Checkpoint
        return _history_frame(obj.history, f"{arg}.history")
    return to_frame(obj, arg)


def _histories(histories: Any, arg: str = "histories") -> pd.DataFrame:
    df = labelled_frame(histories, arg, "optimizer", convert=_history_frame)
    if "optimizer" not in df.columns:
        df["optimizer"] = "run"
    return df


def _accuracy_scale(df: pd.DataFrame, columns: Sequence[str]) -> float:
    values = np.concatenate([df[c].dropna().to_numpy(float) for c in columns if c in df.columns] or [[]])
    return 100.0 if values.size and np.nanmax(values) <= 1.0 else 1.0


@data_argument("histories")
def plot_training_curve(data: Any, metric: str = "loss", *, splits: Sequence[str] = ("train", "test"),
                        x: str = "epoch", log: bool | None = None, ax: Axes | None = None,
                        legend: bool = True, **kwargs: Any) -> Axes:
    """One panel: ``metric`` ("loss" or "acc") against ``x`` for each optimizer and split.

    ``data`` (formerly ``histories=``): a mapping ``{optimizer: metrics.jsonl path | run folder |
    DataFrame | records | Checkpoint}`` or one tidy DataFrame with an ``optimizer`` column and
    columns ``{split}_{metric}``. Test curves are solid, train curves dashed; each optimizer keeps
    its palette colour. ``log`` puts the y axis on a log scale (default: for a loss that spans more
    than a decade). ``kwargs`` go to ``ax.plot`` for every curve.
    """
    choose(metric, tuple(_METRICS), "metric")
    for s in splits:
        choose(s, tuple(_SPLIT_STYLE), "splits")
    df = _histories(data, "data")
    columns = [f"{s}_{metric}" for s in splits]
    present = [c for c in columns if c in df.columns]
    if not present:
        raise UserInputError(f"data has none of the columns {columns}; it has {list(df.columns)}")
    require_columns(df, [x], "data")
    if ax is None:
        _, ax = new_figure()
    scale = _accuracy_scale(df, present) if metric == "acc" else 1.0
    optimizers = ordered_unique(df["optimizer"])
    colors = series_colors(optimizers)
    for i, name in enumerate(optimizers):
        run = df[df["optimizer"] == name].sort_values(x)
        for split in splits:
            col = f"{split}_{metric}"
            if col not in run.columns or run[col].isna().all():
                continue
            ax.plot(run[x], run[col] * scale, **{
                "color": colors[name], "linestyle": _SPLIT_STYLE[split],
                "marker": optimizer_marker(name, i) if len(run) <= 30 else None,
                "markevery": max(1, len(run) // 10), "markersize": 3,
                "label": f"{optimizer_label(name)} ({split})", **kwargs})
    if log is None:  # log only when the loss falls by more than a decade; else linear reads better
        values = df[present].to_numpy(float)
        log = metric == "loss" and np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 10
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if x in ("epoch", "step"):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel(x.capitalize() if x != "step" else "Step")
    ax.set_ylabel(_METRICS[metric] if scale != 1.0 or metric == "loss" else "Accuracy")
    if legend:
        _legend(ax, optimizers, colors, splits, df, metric)
    return ax


def _legend(ax: Axes, optimizers: list[str], colors: dict[str, str], splits: Sequence[str],
            df: pd.DataFrame, metric: str, target: Any = None) -> None:
    handles = [Line2D([], [], color=colors[n], marker=optimizer_marker(n, i), markersize=3,
                      label=optimizer_label(n)) for i, n in enumerate(optimizers)]
    shown = [s for s in splits if f"{s}_{metric}" in df.columns]
    if len(shown) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=_SPLIT_STYLE[s], label=s) for s in shown]
    if target is None:
        ax.legend(handles=handles, loc="best")
    else:
        ncols = legend_columns([h.get_label() for h in handles], target.get_figwidth(), max_columns=6)
        target.legend(handles=handles, loc="outside upper center", ncols=ncols)


@data_argument("histories")
def plot_training_curves(data: Any, metrics: Sequence[str] = ("loss", "acc"), *,
                         splits: Sequence[str] = ("train", "test"), x: str = "epoch",
                         fig: Figure | None = None, **kwargs: Any) -> Figure:
    """Side-by-side panels of :func:`plot_training_curve`, one per metric, with one shared legend
    above the panels (so no legend covers a curve). ``data`` (formerly ``histories=``) as there;
    ``kwargs`` go to ``ax.plot``."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not metrics:
        raise UserInputError("metrics must name at least one of 'loss', 'acc'")
    df = _histories(data, "data")
    fig, axes = figure_axes(fig, 0.42 if len(metrics) > 1 else 0.62, ncols=len(metrics))
    for ax, metric in zip(axes, metrics):
        plot_training_curve(df, metric, splits=splits, x=x, ax=ax, legend=False, **kwargs)
    optimizers = ordered_unique(df["optimizer"])
    _legend(axes[0], optimizers, series_colors(optimizers), splits, df, metrics[0], target=fig)
    return fig

