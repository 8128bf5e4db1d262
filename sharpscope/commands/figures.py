"""``sharpscope figures``: every comparison figure a folder of result files allows.

The files are found recursively under RESULTS_DIR and dispatched on the kind stored inside them
(:func:`sharpscope.analysis.results.result_kind`); the run a file belongs to is the ``<run>`` of its
name ``<run>__<analysis>.nc``. The checkpoints ``epoch_XXXX.pt`` of a run (``train --save-every``) are
points of that run's trajectory, never runs: they feed only ``curvature_trajectory`` and
``mask_stability`` (:func:`split_runs`). Runs are overlaid or set side by side, each in its optimizer's colour,
in the order of :data:`sharpscope.optim.OPTIMIZER_ORDER`. This module only decides which files feed
which figure; every figure is one public function of :mod:`sharpscope.plot`, so it can be redrawn
(and restyled, with matplotlib keyword arguments) from Python:

==============================  ==========================================================================
``spectrum``                    :func:`~sharpscope.plot.plot_density`: eigenvalue densities (log density)
                                with the top-k eigenvalues marked
``sharpness_summary``           :func:`~sharpscope.plot.plot_sharpness_summary`: lambda_max, trace (+-1 s.e.),
                                worst/average sharpness, one bar per run ("n/a" where not measured); with
                                several seeds of a configuration :func:`~sharpscope.plot.plot_seed_summary`:
                                mean +- s.d. over the seeds, every seed a dot
``layer_curvature``             :func:`~sharpscope.plot.plot_layer_curvature`: per-layer top eigenvalue of
                                the diagonal Hessian blocks
``landscape_1d``                :func:`~sharpscope.plot.plot_landscape_1d_panels`: loss and accuracy along a
                                filter-normalised random direction
``contours``                    :func:`~sharpscope.plot.plot_contours`: 2-D loss contours side by side with
                                shared levels
``surfaces``                    :func:`~sharpscope.plot.plot_surfaces`: the 2-D slices in 3-D as small
                                multiples on one z range and colour scale
``surface_<run>``               :func:`~sharpscope.plot.plot_surface` (``log=True``, titled with the run):
                                one slice in 3-D, on the z range shared by all runs
``zscores``                     :func:`~sharpscope.plot.plot_zscore_distributions`: per-layer gradient
                                Z-score distributions against N(0, 1), threshold marked
``mask_summary``                :func:`~sharpscope.plot.plot_mask_summary`: ZSharp's kept fraction and
                                perturbation-norm share per layer
``alignment``                   :func:`~sharpscope.plot.plot_alignment_summary`: the part of each ascent
                                direction in the top-k eigenspace, and its loss increase
``training_curves``             :func:`~sharpscope.plot.plot_training_curves`: loss and accuracy per epoch
                                (from the stored histories, or ``metrics.jsonl`` files found or given)
``mask_heatmap_<run>``          :func:`~sharpscope.plot.plot_mask_heatmap` (``"threshold"``): the threshold
                                tau logged during ZSharp training, layer x step
``interpolation``               :func:`~sharpscope.plot.plot_interpolations`: loss and accuracy on the line
                                between two models (``<a>--<b>__interpolation.nc``), one row per pair,
                                the end points named by their optimizers
``sweep_rho``,                  :func:`~sharpscope.plot.plot_sweep`: test accuracy and lambda_max against
``sweep_percentile``            rho / ZSharp's percentile (mean +- s.d. over seeds), when runs differ in it
``sharpness_vs_gap``            :func:`~sharpscope.plot.plot_sharpness_vs_gap`: every sharpness measure
                                against the generalization gap, Spearman's rank correlation (>= 5 runs)
``cost``                        :func:`~sharpscope.plot.plot_cost`: wall time per epoch and images/s per
                                optimizer, from the histories (``metrics.jsonl``)
``mask_stability``              :func:`~sharpscope.plot.plot_mask_stability`: ZSharp's mask Jaccard across
                                batches per layer over the epochs of one run (``analyze --masks`` on its
                                ``epoch_XXXX.pt``)
``sharpness_over_training``     :func:`~sharpscope.plot.plot_sharpness_over_training`: lambda_max tracked
                                during training (a run trained with ``--track``: the ``<run>__tracking.nc``
                                ``analyze`` stored, else the run folder's ``tracking.jsonl``) against the
                                step, one line per run, its stability threshold dashed
``preconditioned_sharpness``    the same for ``preconditioned`` (lambda_max of P^-1 H; Adam's threshold
                                38/lr)
``tracked_masks_<run>``         :func:`~sharpscope.plot.plot_mask_heatmap` of the tracked ``masks`` rows: the
                                kept fraction, layer x step (the threshold tau when the fraction is fixed)
``curvature_trajectory``        :func:`~sharpscope.plot.plot_curvature_trajectories`: lambda_max and trace
                                (+-1 s.e.) against the epoch, one line per run, when the Hessian of two or
                                more epochs of the same run was analysed (``sharpscope train --save-every
                                K``, then ``analyze --hessian`` on its ``epoch_XXXX.pt``)
==============================  ==========================================================================
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .._progress import progress
from ..errors import UserInputError
from .summary import _EPOCH_NAME

FORMATS = ("pdf", "png")
#: More parameter tensors than this: the layer curvature figure shows the weight matrices only (and says so).
MAX_LAYER_ROWS = 24
#: Fewest runs for the sharpness-vs-gap scatter: a rank correlation of 3 or 4 points says nothing.
MIN_CORRELATION_RUNS = 5


def _load_results(files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """``{kind: {run: loaded result}}`` for every readable result file."""
    from ..analysis.gradients import ZScoreResult
    from ..analysis.hessian import LAYER_KIND, DensityResult, EigenResult, TraceResult, load_layer_curvature
    from ..analysis.landscape import Landscape
    from ..analysis.masks import AlignmentResult
    from ..analysis.results import read_table, result_kind
    from ..analysis.sharpness import SharpnessResult
    from ..track.result import TrackingResult
    from .analyze import HISTORY_KIND, MASK_LOG_KIND, MASKS_KIND, split_result_name

    loaders: dict[str, Callable[[Path], Any]] = {
        EigenResult.KIND: EigenResult.load, TraceResult.KIND: TraceResult.load,
        DensityResult.KIND: DensityResult.load, LAYER_KIND: load_layer_curvature,
        "landscape": Landscape.load, "gradient_zscores": ZScoreResult.load,
        "perturbation_alignment": AlignmentResult.load, "sharpness": SharpnessResult.load,
        HISTORY_KIND: _read_history_table,
        MASK_LOG_KIND: lambda p: read_table(p, MASK_LOG_KIND)[0],
        MASKS_KIND: lambda p: read_table(p, MASKS_KIND)[0],
        TrackingResult.KIND: TrackingResult.load,
    }
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            kind = result_kind(path)
        except Exception:  # noqa: BLE001 -- any unreadable .nc is simply not one of ours
            warnings.warn(f"skipped {path}: not a sharpscope result file", RuntimeWarning, stacklevel=3)
            continue
        if kind not in loaders:
            continue
        run, _ = split_result_name(path)
        result = loaders[kind](path)
        if kind == "landscape":
            kind = f"landscape_{result.settings.get('slice')}"
        elif kind == "sharpness":
            kind = f"sharpness_{result.kind}"
        found.setdefault(kind, {})[run] = result
    return found


def _read_history_table(path: Path) -> pd.DataFrame:
    """A stored history, with the metadata of its checkpoint (path, epoch, optimizer) in ``.attrs``."""
    from ..analysis.results import read_table
    from .analyze import HISTORY_KIND

    frame, meta = read_table(path, HISTORY_KIND)
    frame.attrs["source"] = dict(meta)
    return frame


def checkpoint_sources(found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``run -> {"path", "epoch", "optimizer" (its configuration dict, when stored)}`` from the
    stored histories, the Hessian results and the tracked rows, for every run whose checkpoint is known."""
    sources: dict[str, dict[str, Any]] = {}
    for run, history in found.get("training_history", {}).items():
        meta = history.attrs.get("source") or {}
        if meta.get("checkpoint"):
            sources[run] = {"path": str(meta["checkpoint"]), "epoch": meta.get("epoch"),
                            "optimizer": meta.get("optimizer") or {}}
    for kind in ("hessian_eigenvalues", "hessian_trace", "hessian_density", "tracking"):
        for run, result in found.get(kind, {}).items():
            source = result.settings.get("checkpoint") or {}
            if run not in sources and source.get("path"):
                sources[run] = {"path": str(source["path"]), "epoch": source.get("epoch"),
                                "optimizer": {"name": source.get("optimizer")}}
    return sources


def is_epoch_checkpoint(run: str, sources: dict[str, dict[str, Any]]) -> bool:
    """True when ``run`` comes from an ``epoch_XXXX.pt`` of ``train --save-every``: one point of a
    run's trajectory, never a run of its own. Told by the checkpoint's file name when stored, else
    by the result name ``analyze`` gave it (``epoch_0005`` or ``runs_sam_epoch_0005``)."""
    path = (sources.get(run) or {}).get("path")
    return bool(_EPOCH_NAME.search(Path(path).stem if path else run))


def split_runs(found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``found`` without the epoch checkpoints: what the comparison figures compare (runs only),
    each run under its :func:`~sharpscope.commands.summary.display_names` name (as in the summary)."""
    from .summary import display_names

    sources = checkpoint_sources(found)
    runs = {r for kind in found.values() for r in kind if not is_epoch_checkpoint(r, sources)}
    names = display_names({r: (sources.get(r) or {}).get("path") for r in runs})
    return {kind: kept for kind, results in found.items()
            if (kept := {names[r]: v for r, v in results.items() if r in names})}


def _histories(results_dir: Path, metrics: Sequence[str | Path], found: dict[str, dict[str, Any]]
               ) -> dict[str, pd.DataFrame]:
    """Per-run epoch histories: the stored ones, then ``metrics.jsonl`` files given or found (runs
    with no finished epoch are left out)."""
    from ..plot import read_history
    from ..train.layout import RunLayout

    histories = dict(found.get("training_history", {}))
    given = [Path(m) for m in metrics]
    for path in given + sorted(results_dir.rglob(RunLayout.METRICS)):
        history = read_history(path)
        if history.empty and path in given:
            raise UserInputError(f"--metrics {str(path)!r} holds no finished epoch: no training curve to draw")
        folder = path if path.is_dir() else path.parent
        if not history.empty:
            histories.setdefault(folder.name or str(path), history)
    return histories


def tracked_runs(results_dir: Path, metrics: Sequence[str | Path], found: dict[str, dict[str, Any]],
                 found_all: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``run -> its tracked rows`` (a :class:`~sharpscope.track.result.TrackingResult` or the path of a
    ``tracking.jsonl``) for every run that tracked sharpness while training.

    First the ``<run>__tracking.nc`` that ``analyze`` stored (named as in the summary; a run of which only
    ``epoch_XXXX.pt`` were analysed by its run folder's name), so the figures survive the runs being moved;
    then the ``tracking.jsonl`` of the analysed checkpoints' run folders (named as in the summary), of the
    run folders under ``results_dir`` and of those given with ``--metrics`` (named by their folder). A log
    counts once, and a name too (the first source found).
    """
    tracked: dict[str, Any] = {}
    seen: set[Any] = set()
    stored = list(found.get("tracking", {}).items())
    stored += [(_run_folder_name(run, result), result) for run, result in (found_all or {}).get("tracking", {}).items()]
    for run, result in stored:
        key = _resolved(result.settings.get("source")) or id(result)
        if key not in seen and run not in tracked:
            tracked[run] = result
            seen.add(key)
    for run, path in _tracking_logs(results_dir, metrics, found).items():
        if _resolved(path) not in seen and run not in tracked:
            tracked[run] = path
            seen.add(_resolved(path))
    return tracked


def _tracking_logs(results_dir: Path, metrics: Sequence[str | Path], found: dict[str, dict[str, Any]]
                   ) -> dict[str, Path]:
    """``run -> tracking.jsonl`` in the run folders of the analysed checkpoints, under ``results_dir``
    and given with ``--metrics``, for those that have one."""
    from ..train.layout import RunLayout

    folders = [(run, RunLayout.of_checkpoint(source["path"]).folder) for run, source in checkpoint_sources(found).items()]
    given = [Path(m) if Path(m).is_dir() else Path(m).parent for m in metrics]
    for folder in given + [p.parent for p in sorted(results_dir.rglob(RunLayout.TRACKING))]:
        folders.append((folder.name or str(folder), folder))
    logs: dict[str, Path] = {}
    for run, folder in folders:
        if RunLayout(folder).tracking.is_file():
            logs.setdefault(run, RunLayout(folder).tracking)
    return logs


def _resolved(path: str | Path | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _run_folder_name(run: str, result: Any) -> str:
    """The name of the run folder a stored result's checkpoint came from (else the result's run name)."""
    run_dir = (result.settings.get("checkpoint") or {}).get("run_dir")
    return Path(run_dir).name if run_dir and Path(run_dir).name else run


def draw_figures(results_dir: str | Path, out_dir: str | Path = "figures", style: str = "neurips", *,
                 formats: Sequence[str] = FORMATS, metrics: Sequence[str | Path] = (), column: str = "single",
                 show_progress: bool = True) -> list[Path]:
    """Draw every figure the result files under ``results_dir`` allow into ``out_dir``; return the paths.

    Args:
        results_dir: folder written by ``sharpscope analyze`` (searched recursively), or a folder of run
            folders (or one run folder) not analysed yet that tracked sharpness (``train --track``): then
            the figures their ``tracking.jsonl`` and ``metrics.jsonl`` allow (tracked sharpness and masks,
            training curves).
        out_dir: where the figures go (created); each figure is written in every format of ``formats``.
        style: venue of :func:`sharpscope.plot.style` (``neurips``, ``icml``, ``iclr``, ``paper``).
        metrics: extra ``metrics.jsonl`` files (or run folders) for the training curves.
        column: ``single`` or ``double`` column width.

    Raises:
        UserInputError: unknown style, missing folder, or nothing to draw.
    """
    import matplotlib.pyplot as plt

    from ..plot import VENUES, save_figure
    from ..plot import style as plot_style
    from .summary import result_files, summary_table

    if str(style).lower() not in VENUES:
        raise UserInputError(f"unknown style {style!r}; choose one of: {', '.join(sorted(VENUES))}")
    results_dir = Path(results_dir)
    files = result_files(results_dir)
    found_all = _load_results(files)
    found = split_runs(found_all)  # the comparisons: runs only; epoch checkpoints are trajectories
    tracked = tracked_runs(results_dir, metrics, found, found_all)
    if not files and not tracked:  # run folders that tracked nothing: their figures need `analyze`
        raise _nothing_to_draw(results_dir, files)
    histories = _histories(results_dir, metrics, found)
    jobs = _jobs(found, histories, summary_table(results_dir), found_all, tracked=tracked)
    if not jobs:
        raise _nothing_to_draw(results_dir, files)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {str(out)!r} is a file; give a folder for the figures")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with plot_style(style, column):
        for stem, draw in progress(jobs, enabled=show_progress, desc="figures"):
            fig = draw()
            try:
                written += save_figure(fig, out / stem, formats=formats)
            finally:
                plt.close(fig)
    return written


def _nothing_to_draw(results_dir: Path, files: Sequence[Path]) -> UserInputError:
    """The one-line refusal: no result file (analyse the runs first), or none that gives a figure."""
    if files:
        return UserInputError(f"nothing to draw in {str(results_dir)!r}: no sharpscope result files "
                              f"(run `sharpscope analyze CKPT --out {results_dir}` first)")
    return UserInputError(f"nothing to draw in {str(results_dir)!r}: it holds no sharpscope result files (*.nc) "
                          "and no run that tracked sharpness (tracking.jsonl); if it holds runs, analyse them "
                          f"first: sharpscope analyze {results_dir}/*/last.pt --out results")


def _ordered(runs: dict[str, Any]) -> dict[str, Any]:
    """Runs in :data:`~sharpscope.optim.OPTIMIZER_ORDER` (baselines first, ZSharp last), then by name."""
    from ..plot import optimizer_rank

    return dict(sorted(runs.items(), key=lambda kv: (optimizer_rank(kv[0]), kv[0])))


Job = tuple[str, Callable[[], Any]]


def _fig_of(obj: Any) -> Any:
    """The Figure of what a plot function returned (an Axes or a Figure)."""
    return getattr(obj, "figure", obj)


def _jobs(found: dict[str, dict[str, Any]], histories: dict[str, pd.DataFrame], table: pd.DataFrame,
          found_all: dict[str, dict[str, Any]] | None = None, *,
          tracked: dict[str, Path] | None = None) -> list[Job]:
    """(file stem, function drawing the figure) for every figure the results allow.

    ``found`` holds the runs compared; ``found_all`` also the epoch checkpoints (trajectories only);
    ``tracked`` the ``tracking.jsonl`` of the runs that tracked sharpness (:func:`tracked_runs`).
    """
    from .. import plot

    found_all = found if found_all is None else found_all
    labels = _configuration_labels(table)
    shown = _overlaid_runs(table)
    get = {kind: _by_configuration(_ordered({r: v for r, v in runs.items() if r in shown}), labels)
           if kind in _OVERLAID else _ordered(runs) for kind, runs in found.items()}
    jobs = _curvature_jobs(get, table) + _landscape_jobs(get, found) + _zsharp_jobs(get, found)
    if histories:
        curves = _curves_by_configuration({r: h for r, h in histories.items() if r in shown or r not in labels},
                                          table)
        jobs.append(("training_curves", lambda: plot.plot_training_curves(curves)))
    jobs += _across_run_jobs(table, histories)
    jobs += _tracking_jobs(tracked or {}, table)
    trajectory = curvature_trajectory_table(found_all)
    if not trajectory.empty:
        jobs.append(("curvature_trajectory", lambda: plot.plot_curvature_trajectories(trajectory)))
    stability = mask_stability_table(found_all)
    if not stability.empty:
        jobs.append(("mask_stability", lambda: plot.plot_mask_stability(stability)))
    return jobs


#: Result kinds overlaid in one figure: keyed by configuration (optimizer), so colours follow the optimizer.
_OVERLAID = ("hessian_density", "hessian_eigenvalues", "layer_curvature", "landscape_1d", "gradient_zscores",
             "perturbation_alignment")


#: More configurations than this: overlays show one per optimizer (the one at the common rho / p).
MAX_OVERLAID = 4


def _by_configuration(runs: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """``{configuration label: result}`` in optimizer order; of several seeds of one configuration the
    first is drawn."""
    from ..plot import optimizer_rank

    out: dict[str, Any] = {}
    for run, result in runs.items():
        out.setdefault(labels.get(run, run), result)
    return dict(sorted(out.items(), key=lambda kv: (optimizer_rank(kv[0]), kv[0])))


def _overlaid_runs(table: pd.DataFrame) -> set[str]:
    """The runs overlaid in one figure: all of them, or, with more than :data:`MAX_OVERLAID`
    configurations (a sweep), per optimizer those at the most common rho and percentile (their
    labels name those values), so that a spectrum is not ten curves in two colours."""
    runs = set(table["run"])
    labels = _configuration_labels(table)
    if len(set(labels.values())) <= MAX_OVERLAID:
        return runs
    keep = table
    for c, other in (("rho", "percentile"), ("percentile", "rho")):
        if c in table and table[c].notna().any():
            # the value where the sweeps cross (chosen on all runs): the other hyperparameter varies most there
            rows = table[table[c].notna()]
            spread = rows.groupby(c).agg(n=(other, "nunique") if other in rows else ("run", "size"),
                                         size=("run", "size")).sort_values(["n", "size"], ascending=False)
            keep = keep[keep[c].isna() | (keep[c] == spread.index[0])]
    missing = set(table["optimizer"].dropna()) - set(keep["optimizer"].dropna())
    first = table[table["optimizer"].isin(missing)].drop_duplicates("optimizer")
    return set(keep["run"]) | set(first["run"]) | (runs - set(labels))


def _configuration_labels(table: pd.DataFrame) -> dict[str, str]:
    """run -> the label of its configuration: the optimizer, with rho/p when several values occur."""
    from ..plot.sweep import _config_label

    if "optimizer" not in table:
        return {}
    table = table.assign(optimizer=table["optimizer"].fillna(table["run"]))
    varying = [c for c in ("rho", "percentile") if c in table and table[c].nunique(dropna=True) > 1]
    return {row["run"]: _config_label(row, varying) for _, row in table.iterrows()}


def _curves_by_configuration(histories: dict[str, pd.DataFrame], table: pd.DataFrame) -> pd.DataFrame:
    """The histories as one tidy frame, one series per configuration, seeds averaged per epoch
    (so several seeds of one optimizer are one curve in its colour, not several colours)."""
    from ..plot import optimizer_rank

    labels = _configuration_labels(table)
    parts = []
    for run, history in _ordered(histories).items():
        part = history.copy()
        part["optimizer"] = labels.get(run, run)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.iloc[frame["optimizer"].map(optimizer_rank).argsort(kind="stable")]
    numeric = [c for c in frame.columns if c not in ("optimizer", "epoch") and pd.api.types.is_numeric_dtype(frame[c])]
    return frame.groupby(["optimizer", "epoch"], sort=False)[numeric].mean().reset_index()


def _across_run_jobs(table: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> list[Job]:
    """sweep_rho, sweep_percentile, sharpness_vs_gap, cost: figures across many runs."""
    from .. import plot

    jobs: list[Job] = []
    if "optimizer" not in table:
        return jobs
    runs = table.assign(optimizer=table["optimizer"].fillna(table["run"]))
    for x in ("rho", "percentile"):
        swept = [q for q in ("test_acc", "lambda_max") if q in runs]
        if x in runs and swept and runs.groupby("optimizer")[x].nunique().max() >= 2:
            jobs.append((f"sweep_{x}", lambda x=x, swept=swept: plot.plot_sweep(runs, x, swept)))
    measures = [m for m in ("lambda_max", "trace", "sharpness_worst", "sharpness_average") if m in runs]
    if "gap" in runs and measures and runs[["gap", measures[0]]].notna().all(axis=1).sum() >= MIN_CORRELATION_RUNS:
        jobs.append(("sharpness_vs_gap", lambda: plot.plot_sharpness_vs_gap(runs, measures)))
    cost = cost_table(histories, runs)
    if not cost.empty:
        jobs.append(("cost", lambda: plot.plot_cost(cost)))
    return jobs


def cost_table(histories: dict[str, pd.DataFrame], table: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, epoch) with ``run, optimizer, time_s, images_per_s`` from the histories that
    logged them (``metrics.jsonl`` of sharpscope >= 0.2)."""
    optimizers = dict(zip(table["run"], table["optimizer"])) if "optimizer" in table else {}
    parts = []
    for run, history in histories.items():
        if {"time_s", "images_per_s"} <= set(history.columns) and history["time_s"].notna().any():
            part = history[["epoch", "time_s", "images_per_s"]].dropna().copy()
            part["run"], part["optimizer"] = run, optimizers.get(run) or run
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def mask_stability_table(found: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """``run_dir, epoch, layer, mask_jaccard, kept_fraction`` for the ZSharp masks of every run folder
    with two or more analysed epochs (``analyze --masks`` on its ``epoch_XXXX.pt``); else empty."""
    sources = checkpoint_sources(found)
    rows = []
    for run, masks in found.get("mask_statistics", {}).items():
        source = sources.get(run)
        if not source or source.get("epoch") is None or "mask_jaccard" not in masks.columns:
            continue
        part = masks[["layer", "mask_jaccard", "kept_fraction"]].copy()
        part["run_dir"] = str(Path(source["path"]).resolve().parent)
        part["epoch"] = int(source["epoch"])
        rows.append(part)
    if not rows:
        return pd.DataFrame()
    table = pd.concat(rows, ignore_index=True).drop_duplicates(["run_dir", "epoch", "layer"])
    epochs = table.groupby("run_dir")["epoch"].nunique()
    keep = epochs[epochs >= 2].index
    if len(keep) == 0:
        return pd.DataFrame()
    return table[table["run_dir"] == keep[0]].reset_index(drop=True)


def _curvature_jobs(get: dict[str, dict[str, Any]], table: pd.DataFrame) -> list[Job]:
    """spectrum, sharpness_summary, layer_curvature."""
    from .. import plot

    jobs: list[Job] = []
    if "hessian_density" in get:
        dens = get["hessian_density"]
        eig = {r: e for r, e in get.get("hessian_eigenvalues", {}).items() if r in dens}
        jobs.append(("spectrum", lambda: _fig_of(plot.plot_density(dens, eigenvalues=eig or None))))
    quantities = [q for q in ("lambda_max", "trace", "sharpness_worst", "sharpness_average") if q in table]
    config = [c for c in ("optimizer", "rho", "percentile") if c in table]
    if quantities and "optimizer" in table and table.groupby(config, dropna=False).size().max() > 1:
        # several seeds of one configuration: mean +- s.d. over the seeds, every seed a dot
        runs = table.assign(optimizer=table["optimizer"].fillna(table["run"]))
        shown = [q for q in ("test_acc", *quantities) if q in runs]
        jobs.append(("sharpness_summary", lambda: plot.plot_seed_summary(runs, shown, config=config)))
    elif quantities:
        table = table.set_index("run").loc[list(_ordered(dict.fromkeys(table["run"])))].reset_index()
        jobs.append(("sharpness_summary", lambda: plot.plot_sharpness_summary(table, quantities)))
    if "layer_curvature" in get:
        curvature = get["layer_curvature"]
        many = max(len(r.to_dataframe()) for r in curvature.values()) > MAX_LAYER_ROWS  # e.g. every BatchNorm
        jobs.append(("layer_curvature", lambda: _fig_of(plot.plot_layer_curvature(curvature, matrices_only=many))))
    return jobs


def _landscape_jobs(get: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[Job]:
    """landscape_1d, contours, surface_<run>, interpolation."""
    from .. import plot

    jobs: list[Job] = []
    if "landscape_1d" in get:
        jobs.append(("landscape_1d", lambda: plot.plot_landscape_1d_panels(get["landscape_1d"])))
    if "landscape_2d" in get:
        jobs.append(("contours", lambda: plot.plot_contours(get["landscape_2d"])))
        surfaces = get["landscape_2d"]
        zlim = plot.surface_limits(surfaces)  # one z range and colour scale: surfaces compare
        if len(surfaces) > 1:
            jobs.append(("surfaces", lambda: plot.plot_surfaces(surfaces)))
        for run, result in surfaces.items():
            jobs.append((f"surface_{run}", lambda run=run, result=result: _fig_of(
                plot.plot_surface(result, log=True, zlim=zlim, title=f"{plot.optimizer_label(run)}"
                                  + ("\n(z range shared by all runs)" if len(surfaces) > 1 else "")))))
    if "landscape_interpolation" in found:
        pairs = _ordered_pairs(found["landscape_interpolation"])
        jobs.append(("interpolation", lambda: plot.plot_interpolations(pairs)))
    return jobs


def _zsharp_jobs(get: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[Job]:
    """zscores, mask_summary, alignment, mask_heatmap_<run>."""
    from .. import plot
    from ..plot.style import optimizer_key

    jobs: list[Job] = []
    if "gradient_zscores" in get:
        jobs.append(("zscores", lambda: plot.plot_zscore_distributions(get["gradient_zscores"])))
    if "mask_statistics" in get:
        # One checkpoint: the shares of several runs side by side would be confused with SAM's reference bar.
        runs = get["mask_statistics"]
        masks = runs[next((r for r in runs if optimizer_key(r) == "zsharp"), next(iter(runs)))]
        jobs.append(("mask_summary", lambda: plot.plot_mask_summary(masks, percentile=_percentile(found))))
    if "perturbation_alignment" in get:
        jobs.append(("alignment", lambda: plot.plot_alignment_summary(get["perturbation_alignment"])))
    for run, log in get.get("mask_log", {}).items():
        # the kept fraction is fixed by p and the layer's size; the threshold shows how heavy the tails are
        jobs.append((f"mask_heatmap_{run}", lambda log=log: _fig_of(plot.plot_mask_heatmap(log, "threshold"))))
    return jobs


#: Tracked measures drawn against the step, and the file stem of each figure.
TRACKED_FIGURES = {"lambda_max": "sharpness_over_training", "preconditioned": "preconditioned_sharpness"}


def _tracking_jobs(tracked: dict[str, Any], table: pd.DataFrame) -> list[Job]:
    """sharpness_over_training, preconditioned_sharpness, tracked_masks_<run>: from the rows the runs
    tracked while training (a stored :class:`~sharpscope.track.result.TrackingResult` or a
    ``tracking.jsonl``, :func:`tracked_runs`), one line per configuration."""
    from .. import plot
    from ..plot.tracking import tracked_frame

    labels = _tracked_labels(tracked, table)
    rows: dict[str, pd.DataFrame] = {}
    for run, source in _ordered(tracked).items():
        try:
            rows[run] = tracked_frame(source, run)
        except UserInputError as exc:  # one damaged log must not cost every other figure
            warnings.warn(f"skipped the tracked rows of {run}: {exc}", RuntimeWarning, stacklevel=3)
    runs: dict[str, pd.DataFrame] = {}
    for run, frame in rows.items():
        if not frame.empty:
            runs.setdefault(labels[run], frame)  # of several seeds of one configuration, the first
    jobs: list[Job] = []
    for measure, stem in TRACKED_FIGURES.items():
        series = {label: frame for label, frame in runs.items() if (frame["measure"] == measure).any()}
        if series:
            jobs.append((stem, lambda m=measure, s=series: _fig_of(plot.plot_sharpness_over_training(s, m))))
    for run, frame in rows.items():
        if not frame.empty and (frame["measure"] == "masks").any():
            jobs.append((f"tracked_masks_{run}", lambda source=tracked[run]: _tracked_mask_heatmap(source)))
    return jobs


def _tracked_labels(tracked: dict[str, Any], table: pd.DataFrame) -> dict[str, str]:
    """run -> its series label: its configuration in the summary table; for a run the table does not know
    (a run folder found, no result of it), the optimizer it was trained with when no other series has that
    label, else the run's name."""
    from collections import Counter

    from ..plot.tracking import run_label

    configured = _configuration_labels(table)
    known = {run: configured[run] for run in tracked if run in configured}
    guessed = {}
    for run, source in tracked.items():
        if run not in known:
            trained = run_label(source) if isinstance(source, (str, Path)) else \
                (source.settings.get("checkpoint") or {}).get("optimizer")
            guessed[run] = str(trained or run)
    taken = Counter([*known.values(), *guessed.values()])
    return {**known, **{run: label if taken[label] == 1 else run for run, label in guessed.items()}}


def _tracked_mask_heatmap(source: Any) -> Any:
    """ZSharp's kept fraction per layer and step, or, when no layer's varies over the steps (it is fixed
    by p and the layer's size unless the filter falls back to SAM), the threshold tau, which shows how
    heavy the gradient's tails are."""
    from .. import plot

    masks = plot.tracked_masks(source)
    spread = masks.groupby("layer")["kept_fraction"].agg(lambda v: float(v.max() - v.min())).max()
    return _fig_of(plot.plot_mask_heatmap(masks, "kept_fraction" if spread > 1e-6 else "threshold"))


def _ordered_pairs(pairs: dict[str, Any]) -> dict[str, Any]:
    """Interpolations ordered by their first end point (SGD, SAM, ... as elsewhere), then by name."""
    from ..plot import optimizer_rank

    def key(item: tuple[str, Any]) -> tuple[int, str]:
        a = item[1].settings.get("model_a") or {}
        return optimizer_rank(a.get("optimizer") or a.get("run") or ""), item[0]

    return dict(sorted(pairs.items(), key=key))


def curvature_trajectory_table(found: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """lambda_max and trace +- s.e. per epoch of every run with two or more analysed epochs.

    Columns ``optimizer`` (the series label: the optimizer, or the run folder's name when two runs
    share one), ``run_dir``, ``epoch``, ``lambda_max``, ``trace``, ``trace_stderr``. The epoch and the
    run folder come from the checkpoint, as stored by ``sharpscope analyze``; ``last.pt``/``best.pt``
    repeating an ``epoch_XXXX.pt`` count once. Empty when no run has two epochs.
    """
    from ..plot import optimizer_rank

    traces = found.get("hessian_trace", {})
    rows = []
    for run, eig in found.get("hessian_eigenvalues", {}).items():
        source = eig.settings.get("checkpoint") or {}
        trace = traces.get(run)
        if not {"run_dir", "epoch", "path"} <= source.keys() or trace is None:
            continue
        if (trace.settings.get("checkpoint") or {}).get("path") != source["path"]:
            continue  # the two files of this run name come from different checkpoints
        rows.append({"optimizer": source.get("optimizer") or Path(source["run_dir"]).name,
                     "run_dir": source["run_dir"], "epoch": int(source["epoch"]),
                     "lambda_max": float(eig.eigenvalues[0]), "trace": float(trace.estimate),
                     "trace_stderr": float(trace.stderr)})
    columns = ["optimizer", "run_dir", "epoch", "lambda_max", "trace", "trace_stderr"]
    table = pd.DataFrame(rows, columns=columns).drop_duplicates(["run_dir", "epoch"])
    epochs = table.groupby("run_dir")["epoch"].nunique()
    table = table[table["run_dir"].isin(epochs[epochs >= 2].index)].copy()
    if table.groupby("optimizer")["run_dir"].nunique().gt(1).any():
        table["optimizer"] = table["run_dir"].map(lambda d: Path(d).name)
    table["_rank"] = table["optimizer"].map(optimizer_rank)
    table = table.sort_values(["_rank", "optimizer", "epoch"]).drop(columns="_rank")
    return table.reset_index(drop=True)


def _percentile(found: dict[str, dict[str, Any]]) -> float | None:
    values = {round(float(z.percentile), 12) for z in found.get("gradient_zscores", {}).values()}
    return values.pop() if len(values) == 1 else None


# --- the command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS_DIR",
                        help="folder of result files (sharpscope analyze --out), or of run folders that tracked "
                             "sharpness (tracked figures and training curves only)")
    parser.add_argument("--out", default="figures", help="folder for the figures (default: figures)")
    parser.add_argument("--style", default="neurips", help="venue: neurips (default), icml, iclr, paper")
    parser.add_argument("--column", choices=["single", "double"], default="single",
                        help="figure width: one column (default) or the whole text width")
    parser.add_argument("--formats", default="pdf,png", help="comma-separated: pdf, png, svg, eps (default pdf,png)")
    parser.add_argument("--metrics", nargs="*", default=[], metavar="PATH",
                        help="metrics.jsonl files or run folders for the training curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .summary import markdown_table, seed_markdown, seed_table, summary_table

    formats = [f.strip() for f in str(args.formats).split(",") if f.strip()]
    start = time.perf_counter()
    written = draw_figures(args.results, args.out, args.style, formats=formats, metrics=args.metrics,
                           column=args.column, show_progress=not args.quiet and sys.stderr.isatty())
    stems = sorted({p.stem for p in written})
    print(f"wrote {len(written)} files ({len(stems)} figures: {', '.join(stems)}) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    table = summary_table(args.results)
    print(markdown_table(table), end="")
    if "optimizer" in table and len(seed_table(table)) < len(table):  # several seeds: mean +- s.d. too
        print()
        print(seed_markdown(table), end="")
    return 0
