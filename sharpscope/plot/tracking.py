r"""Sharpness during training, drawn from the rows of :class:`sharpscope.track.SharpnessTracker`.

The tracker writes one row per measure and event into ``<run>/tracking.jsonl``
(:func:`sharpscope.track.read_tracking`): ``step, measure, value`` and, by measure, ``residual``
(relative, :math:`\|Hy - \theta y\| / |\theta|`), ``error_bound`` (a bound on
:math:`|\lambda - \theta|`), ``stderr`` (trace), ``threshold`` (the edge of stability: :math:`(2 +
2\beta)/\eta` for SGD with momentum :math:`\beta`, :math:`(2 + 2\beta_1) / ((1 - \beta_1)\eta) = 38/\eta`
for Adam's :math:`\lambda_{\max}(P^{-1}H)`) and per-layer values (``masks``: ZSharp's kept fraction,
threshold, perturbation share per layer).

* :func:`plot_sharpness_over_training`: a tracked sharpness against the training step, one line per
  run in its optimizer's colour, its stability threshold dashed in the same colour, error bars from
  the Lanczos error bound (or residual, or the trace's standard error).
* :func:`tracked_masks`: the tracked ``masks`` rows as the per-layer table that
  :func:`~sharpscope.plot.plot_mask_heatmap` draws (which also takes tracked rows directly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from ..errors import UserInputError
from ._data import choose, ordered_unique, require_columns, require_finite, to_frame
from .style import (
    figure_width,
    legend_columns,
    new_figure,
    optimizer_label,
    optimizer_marker,
    optimizer_rank,
    series_colors,
)

__all__ = ["plot_sharpness_over_training", "tracked_masks", "tracked_rows"]

#: The measures drawn against the step, with their axis labels.
MEASURE_LABELS = {
    "lambda_max": r"Top Hessian eigenvalue $\lambda_{\max}(H)$",
    "preconditioned": r"Preconditioned sharpness $\lambda_{\max}(P^{-1}H)$",
    "trace": r"Hessian trace $\mathrm{tr}(H)$",
    "update_curvature": r"Curvature along the update $d^\top H d / \|d\|^2$",
}
#: A threshold above this multiple of the largest value is named in the legend, not drawn (it would
#: flatten the curves against the bottom of the panel).
OFF_SCALE = 3.0
_THRESHOLD_STYLE = {"linestyle": "--", "linewidth": 0.9}


# --- reading --------------------------------------------------------------------------------------------
def _is_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _run_folder(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def run_label(path: str | os.PathLike[str]) -> str:
    """The optimizer a run folder was trained with (its ``config.json``), else the folder's name."""
    from ..train.layout import RunLayout

    folder = _run_folder(path)
    try:
        return str(json.loads(RunLayout(folder).config.read_text(encoding="utf-8"))["config"]["optimizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name or str(path)


def tracked_frame(obj: Any, arg: str = "data") -> pd.DataFrame:
    """Tracked rows of one run: a run folder or ``tracking.jsonl``, a FitResult, a tracker, a stored
    ``TrackingResult``, a DataFrame."""
    if _is_path(obj):
        from ..track import read_tracking

        return read_tracking(obj)
    if isinstance(getattr(obj, "tracking", None), pd.DataFrame):  # fit's FitResult
        return obj.tracking.copy()
    return to_frame(obj, arg)


def _labelled(data: Any) -> list[tuple[str | None, Any, str]]:
    """``(label or None, object, argument name)`` for each run in ``data``."""
    if isinstance(data, Mapping):
        if not data:
            raise UserInputError("data: the mapping is empty; give at least one run")
        return [(str(k), v, f"data[{k!r}]") for k, v in data.items()]
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and data and all(map(_is_path, data)):
        labels = [run_label(p) for p in data]
        if len(set(labels)) < len(labels):  # two runs of one optimizer: their folders tell them apart
            labels = [_run_folder(p).name or str(p) for p in data]
        return [(lab, p, f"data[{i}]") for i, (lab, p) in enumerate(zip(labels, data))]
    return [(run_label(data) if _is_path(data) else None, data, "data")]


def tracked_rows(data: Any, measure: str) -> pd.DataFrame:
    """The tracked rows of ``measure``, one series per run: ``optimizer, step, value`` and whatever else
    the rows hold (``threshold``, ``residual``, ``error_bound``, ``stderr``, ...), runs in
    :data:`~sharpscope.optim.OPTIMIZER_ORDER`.

    ``data``: a run folder or its ``tracking.jsonl``, a list of them (labelled by the optimizer in each
    run's ``config.json``), a mapping ``{label: folder | DataFrame | FitResult | SharpnessTracker}``, or
    one DataFrame of tracked rows (``step, measure, value, ...``; an ``optimizer`` column makes series).
    """
    parts = []
    for label, obj, arg in _labelled(data):
        frame = tracked_frame(obj, arg)
        if "measure" in frame.columns:
            have = ordered_unique(frame["measure"].dropna())
            frame = frame[frame["measure"] == measure]
            if frame.empty:
                source = f" in {obj}" if _is_path(obj) else ""
                raise UserInputError(f"{arg} has no tracked {measure!r} rows{source} (it has {have or 'none'}); "
                                     f"track it: fit(..., track={measure!r}) or sharpscope train --track {measure}")
        require_columns(frame, ["step", "value"], arg)
        frame = frame.copy()
        if label is not None or "optimizer" not in frame.columns:
            frame["optimizer"] = label if label is not None else "run"
        parts.append(frame)
    df = pd.concat(parts, ignore_index=True)
    require_finite(df["value"].to_numpy(float), f"data[{measure!r}] values")
    ranks = df["optimizer"].map(optimizer_rank)
    return df.iloc[ranks.argsort(kind="stable")].reset_index(drop=True)


def tracked_masks(data: Any) -> pd.DataFrame:
    """ZSharp's tracked ``masks`` rows as one row per (step, layer): ``step, layer, kept_fraction,
    threshold, perturbation_share, fallback`` (the table :func:`~sharpscope.plot.plot_mask_heatmap` draws).

    ``data``: a run folder or its ``tracking.jsonl``, a :class:`~sharpscope.track.SharpnessTracker`, or
    the tidy per-layer rows of :func:`sharpscope.track.read_tracking_layers` (``step, layer, key, value``).
    """
    if _is_path(data):
        from ..track import read_tracking_layers

        rows = read_tracking_layers(data, "masks")
        where = f" in {data}"
    elif hasattr(data, "layer_dataframe"):
        rows, where = data.layer_dataframe("masks"), ""
    else:
        rows, where = to_frame(data, "data"), ""
        if "measure" in rows.columns:
            rows = rows[rows["measure"] == "masks"]
    if rows.empty:
        raise UserInputError(f"no tracked 'masks' rows{where}; track them on a ZSharp run: fit(..., "
                             "track='masks') or sharpscope train --optimizer zsharp --track masks")
    require_columns(rows, ["step", "layer", "key", "value"], "data")
    wide = rows.pivot_table(index=["step", "layer"], columns="key", values="value", aggfunc="mean", sort=False)
    wide = wide.reset_index()
    wide.columns.name = None
    return wide


# --- drawing --------------------------------------------------------------------------------------------
def _errors(run: pd.DataFrame) -> np.ndarray | None:
    """Half-width of each point's error bar: the Lanczos error bound on |lambda - theta|, else the
    residual norm |H y - theta y| (relative residual times |theta|), else a standard error."""
    value = run["value"].to_numpy(float)
    for column, scale in (("error_bound", 1.0), ("residual", np.abs(value)), ("stderr", 1.0)):
        if column in run.columns and run[column].notna().any():
            return run[column].to_numpy(float) * scale
    return None


def _draw_series(ax: Axes, run: pd.DataFrame, color: str, marker: str, label: str, log: bool,
                 kwargs: dict[str, Any]) -> None:
    steps, values = run["step"].to_numpy(float), run["value"].to_numpy(float)
    many = len(run) > 40
    ax.plot(steps, values, **{"color": color, "marker": marker, "markersize": 3 if len(run) <= 20 else 2.2,
                              "markevery": max(1, len(run) // 20) if many else None, "label": label,
                              "linewidth": 1.1, **kwargs})
    err = _errors(run)
    if err is None or not np.isfinite(err).any():
        return
    err = np.nan_to_num(err, nan=0.0)
    lower = np.minimum(err, 0.9 * values) if log else err  # a log axis cannot show a bar through zero
    if many:
        ax.fill_between(steps, values - lower, values + err, color=color, alpha=0.2, linewidth=0)
    else:
        ax.errorbar(steps, values, yerr=np.vstack([lower, err]), fmt="none", ecolor=color, elinewidth=0.7,
                    capsize=1.5, capthick=0.7)


def _thresholds(df: pd.DataFrame, names: list[str]) -> dict[str, pd.DataFrame]:
    """Per run, its ``step, threshold`` rows (runs without a threshold left out)."""
    if "threshold" not in df.columns:
        return {}
    out = {}
    for name in names:
        part = df[(df["optimizer"] == name) & df["threshold"].notna()].sort_values("step")
        if not part.empty:
            out[name] = part[["step", "threshold"]].reset_index(drop=True)
    return out


def _draw_thresholds(ax: Axes, lines: dict[str, pd.DataFrame], colors: dict[str, str], top: float, log: bool,
                     measure: str) -> tuple[list[Line2D], float | None]:
    """The dashed thresholds: one grey line when every run has the same one (same schedule), else one per
    run that has one, in its colour; a legend note instead when the lowest lies more than ``OFF_SCALE`` x ``top`` above the
    values (ten times on a log axis). Returns the legend handles and the lowest threshold drawn."""
    if not lines:
        return [], None
    lowest = min(float(t["threshold"].min()) for t in lines.values())
    name = r"edge of stability $(2 + 2\beta)/\eta$" if measure == "lambda_max" else "edge of stability"
    first = next(iter(lines.values()))
    shared = len(lines) == len(colors) > 1 and all(t.equals(first) for t in lines.values())
    if lowest > (10.0 if log else OFF_SCALE) * top > 0:
        note = f"{name} $\\geq$ {_number(lowest)} (off scale)"
        return [Line2D([], [], color="0.35", label=note, **_THRESHOLD_STYLE)], None
    series = {"": first} if shared else lines
    for run, t in series.items():
        ax.plot(t["step"].to_numpy(float), t["threshold"].to_numpy(float),
                color=colors.get(run, "0.35"), zorder=1, **_THRESHOLD_STYLE)
    if shared:
        label, color = name, "0.35"
    elif len(lines) == 1:
        run = next(iter(lines))
        label, color = f"{name}, {optimizer_label(run)}", colors[run]
    else:
        label, color = f"{name} (in each run's colour)", "0.6"
    return [Line2D([], [], color=color, label=label, **_THRESHOLD_STYLE)], lowest


def _number(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _use_log(values: np.ndarray, log: bool | None) -> bool:
    positive = bool(values.size and np.all(values > 0))
    if log is None:  # a decade or more: a linear axis would flatten the early or the late part
        return positive and values.max() / values.min() > 10.0
    if log and not positive:
        raise UserInputError("log=True needs positive values; some tracked values are <= 0: use log=False")
    return bool(log)


def plot_sharpness_over_training(data: Any, measure: str = "lambda_max", *, threshold: bool = True,
                                 log: bool | None = None, ax: Axes | None = None, legend: bool = True,
                                 **kwargs: Any) -> Axes:
    r"""A tracked sharpness against the training step, one line per run, stability threshold dashed.

    ``data``: a run folder (or its ``tracking.jsonl``), a list of run folders, a mapping ``{label: run
    folder | DataFrame | FitResult | SharpnessTracker}`` or a DataFrame of tracked rows (see
    :func:`tracked_rows`). ``measure``: ``lambda_max`` (:math:`\lambda_{\max}(H)`), ``preconditioned``
    (:math:`\lambda_{\max}(P^{-1}H)`, Adam's :math:`P = \mathrm{diag}(\sqrt{\hat v}) + \epsilon`; :math:`P
    = I` for SGD), ``trace`` or ``update_curvature``. Each run keeps its optimizer's colour. The rows'
    ``threshold`` (:math:`(2 + 2\beta)/\eta` for SGD, :math:`38/\eta` for Adam at :math:`\beta_1 = 0.9`;
    it rises as a schedule lowers :math:`\eta`) is dashed: once in grey when all runs share it, else in
    each run's colour; named in the legend instead when it lies far above the values (``OFF_SCALE``
    times, ten times on a log axis). Error bars: the Lanczos error bound on :math:`|\lambda - \theta|`
    (else the residual norm, or the trace's standard error); a band beyond 40 points. ``log``: default
    on when the values span more than a decade. ``kwargs`` go to ``ax.plot`` for every run.
    """
    choose(measure, tuple(MEASURE_LABELS), "measure")
    df = tracked_rows(data, measure)
    names = ordered_unique(df["optimizer"])
    colors = series_colors(names)
    values = df["value"].to_numpy(float)
    log = _use_log(values, log)
    made = ax is None
    if ax is None:
        _, ax = new_figure(0.5 if figure_width() >= 4 else 0.75)  # a one-column ICML figure needs the height
    for i, name in enumerate(names):
        run = df[df["optimizer"] == name].sort_values("step")
        _draw_series(ax, run, colors[name], optimizer_marker(name, i), optimizer_label(name), log, kwargs)
    lines = _thresholds(df, names) if threshold else {}
    extra, lowest = _draw_thresholds(ax, lines, colors, float(np.abs(values).max()), log, measure)
    _finish_axes(ax, measure, log, values, lowest)
    if legend:
        _legend(ax, names, colors, extra, made)
    return ax


def _finish_axes(ax: Axes, measure: str, log: bool, values: np.ndarray, lowest: float | None) -> None:
    if log:
        ax.set_yscale("log")
    if lowest is not None:  # show the threshold where it is lowest; as the learning rate decays it may leave the top
        cap = max(float(values.max()), lowest)
        ax.set_ylim(top=cap * (1.6 if log else 1.12))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("Training step")
    ax.set_ylabel(MEASURE_LABELS[measure])


def _legend(ax: Axes, names: list[str], colors: dict[str, str], extra: list[Line2D], made: bool) -> None:
    handles = [Line2D([], [], color=colors[n], marker=optimizer_marker(n, i), markersize=3, linewidth=1.1,
                      label=optimizer_label(n)) for i, n in enumerate(names)] + extra
    if not made:
        ax.legend(handles=handles, loc="best")
        return
    fig = ax.figure
    ncols = legend_columns([h.get_label() for h in handles], fig.get_figwidth(), max_columns=4)
    fig.legend(handles=handles, loc="outside upper center", ncols=ncols)
