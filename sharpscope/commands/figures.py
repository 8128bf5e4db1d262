"""``sharpscope figures``: every comparison figure a folder of result files allows.

The files are found recursively under RESULTS_DIR and dispatched on the kind stored inside them
(:func:`sharpscope.analysis.results.result_kind`); the run a file belongs to is the ``<run>`` of its
name ``<run>__<analysis>.nc``. Runs are overlaid or set side by side, each in its optimizer's colour,
in the order of :data:`sharpscope.optim.OPTIMIZER_ORDER`. This module only decides which files feed
which figure; every figure is one public function of :mod:`sharpscope.plot`, so it can be redrawn
(and restyled, with matplotlib keyword arguments) from Python:

==========================  ==========================================================================
``spectrum``                :func:`~sharpscope.plot.plot_density`: eigenvalue densities (log density)
                            with the top-k eigenvalues marked
``sharpness_summary``       :func:`~sharpscope.plot.plot_sharpness_summary`: lambda_max, trace (+-1 s.e.),
                            worst/average sharpness, one bar per run
``layer_curvature``         :func:`~sharpscope.plot.plot_layer_curvature`: per-layer top eigenvalue of
                            the diagonal Hessian blocks
``landscape_1d``            :func:`~sharpscope.plot.plot_landscape_1d_panels`: loss and accuracy along a
                            filter-normalised random direction
``contours``                :func:`~sharpscope.plot.plot_contours`: 2-D loss contours side by side with
                            shared levels
``surface_<run>``           :func:`~sharpscope.plot.plot_surface` (``log=True``, titled with the run):
                            the same slice in 3-D
``zscores``                 :func:`~sharpscope.plot.plot_zscore_distributions`: per-layer gradient
                            Z-score distributions against N(0, 1), threshold marked
``mask_summary``            :func:`~sharpscope.plot.plot_mask_summary`: ZSharp's kept fraction and
                            perturbation-norm share per layer
``alignment``               :func:`~sharpscope.plot.plot_alignment_summary`: the part of each ascent
                            direction in the top-k eigenspace, and its loss increase
``training_curves``         :func:`~sharpscope.plot.plot_training_curves`: loss and accuracy per epoch
                            (from the stored histories, or ``metrics.jsonl`` files found or given)
``mask_heatmap_<run>``      :func:`~sharpscope.plot.plot_mask_heatmap` (``"threshold"``): the threshold
                            tau logged during ZSharp training, layer x step
``interpolation``           :func:`~sharpscope.plot.plot_interpolations`: loss and accuracy on the line
                            between two models (``<a>--<b>__interpolation.nc``), one row per pair,
                            the end points named by their optimizers
``curvature_trajectory``    :func:`~sharpscope.plot.plot_curvature_trajectories`: lambda_max and trace
                            (+-1 s.e.) against the epoch, one line per run, when the Hessian of two or
                            more epochs of the same run was analysed (``sharpscope train --save-every
                            K``, then ``analyze --hessian`` on its ``epoch_XXXX.pt``)
==========================  ==========================================================================
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

FORMATS = ("pdf", "png")


def _load_results(files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """``{kind: {run: loaded result}}`` for every readable result file."""
    from ..analysis.gradients import ZScoreResult
    from ..analysis.hessian import LAYER_KIND, DensityResult, EigenResult, TraceResult, load_layer_curvature
    from ..analysis.landscape import Landscape
    from ..analysis.masks import AlignmentResult
    from ..analysis.results import read_table, result_kind
    from ..analysis.sharpness import SharpnessResult
    from .analyze import HISTORY_KIND, MASK_LOG_KIND, MASKS_KIND, split_result_name

    loaders: dict[str, Callable[[Path], Any]] = {
        EigenResult.KIND: EigenResult.load, TraceResult.KIND: TraceResult.load,
        DensityResult.KIND: DensityResult.load, LAYER_KIND: load_layer_curvature,
        "landscape": Landscape.load, "gradient_zscores": ZScoreResult.load,
        "perturbation_alignment": AlignmentResult.load, "sharpness": SharpnessResult.load,
        HISTORY_KIND: lambda p: read_table(p, HISTORY_KIND)[0],
        MASK_LOG_KIND: lambda p: read_table(p, MASK_LOG_KIND)[0],
        MASKS_KIND: lambda p: read_table(p, MASKS_KIND)[0],
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


def draw_figures(results_dir: str | Path, out_dir: str | Path = "figures", style: str = "neurips", *,
                 formats: Sequence[str] = FORMATS, metrics: Sequence[str | Path] = (), column: str = "single",
                 show_progress: bool = True) -> list[Path]:
    """Draw every figure the result files under ``results_dir`` allow into ``out_dir``; return the paths.

    Args:
        results_dir: folder written by ``sharpscope analyze`` (searched recursively).
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
    found = _load_results(files)
    histories = _histories(results_dir, metrics, found)
    jobs = _jobs(found, histories, summary_table(results_dir))
    if not jobs:
        raise UserInputError(f"nothing to draw in {str(results_dir)!r}: no sharpscope result files "
                             f"(run `sharpscope analyze CKPT --out {results_dir}` first)")
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


def _ordered(runs: dict[str, Any]) -> dict[str, Any]:
    """Runs in :data:`~sharpscope.optim.OPTIMIZER_ORDER` (baselines first, ZSharp last), then by name."""
    from ..plot import optimizer_rank

    return dict(sorted(runs.items(), key=lambda kv: (optimizer_rank(kv[0]), kv[0])))


Job = tuple[str, Callable[[], Any]]


def _fig_of(obj: Any) -> Any:
    """The Figure of what a plot function returned (an Axes or a Figure)."""
    return getattr(obj, "figure", obj)


def _jobs(found: dict[str, dict[str, Any]], histories: dict[str, pd.DataFrame], table: pd.DataFrame
          ) -> list[Job]:
    """(file stem, function drawing the figure) for every figure the results allow."""
    from .. import plot

    get = {kind: _ordered(runs) for kind, runs in found.items()}
    jobs = _curvature_jobs(get, table) + _landscape_jobs(get, found) + _zsharp_jobs(get, found)
    if histories:
        jobs.append(("training_curves", lambda: plot.plot_training_curves(_ordered(histories))))
    trajectory = curvature_trajectory_table(found)
    if not trajectory.empty:
        jobs.append(("curvature_trajectory", lambda: plot.plot_curvature_trajectories(trajectory)))
    return jobs


def _curvature_jobs(get: dict[str, dict[str, Any]], table: pd.DataFrame) -> list[Job]:
    """spectrum, sharpness_summary, layer_curvature."""
    from .. import plot

    jobs: list[Job] = []
    if "hessian_density" in get:
        dens = get["hessian_density"]
        eig = {r: e for r, e in get.get("hessian_eigenvalues", {}).items() if r in dens}
        jobs.append(("spectrum", lambda: _fig_of(plot.plot_density(dens, eigenvalues=eig or None))))
    quantities = [q for q in ("lambda_max", "trace", "sharpness_worst", "sharpness_average") if q in table]
    if quantities:
        table = table.set_index("run").loc[list(_ordered(dict.fromkeys(table["run"])))].reset_index()
        jobs.append(("sharpness_summary", lambda: plot.plot_sharpness_summary(table, quantities)))
    if "layer_curvature" in get:
        jobs.append(("layer_curvature", lambda: _fig_of(plot.plot_layer_curvature(get["layer_curvature"]))))
    return jobs


def _landscape_jobs(get: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[Job]:
    """landscape_1d, contours, surface_<run>, interpolation."""
    from .. import plot

    jobs: list[Job] = []
    if "landscape_1d" in get:
        jobs.append(("landscape_1d", lambda: plot.plot_landscape_1d_panels(get["landscape_1d"])))
    if "landscape_2d" in get:
        jobs.append(("contours", lambda: plot.plot_contours(get["landscape_2d"])))
        for run, result in get["landscape_2d"].items():
            jobs.append((f"surface_{run}", lambda run=run, result=result: _fig_of(
                plot.plot_surface(result, log=True, title=plot.optimizer_label(run)))))
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
    parser.add_argument("results", metavar="RESULTS_DIR", help="folder of result files (sharpscope analyze --out)")
    parser.add_argument("--out", default="figures", help="folder for the figures (default: figures)")
    parser.add_argument("--style", default="neurips", help="venue: neurips (default), icml, iclr, paper")
    parser.add_argument("--column", choices=["single", "double"], default="single",
                        help="figure width: one column (default) or the whole text width")
    parser.add_argument("--formats", default="pdf,png", help="comma-separated: pdf, png, svg, eps (default pdf,png)")
    parser.add_argument("--metrics", nargs="*", default=[], metavar="PATH",
                        help="metrics.jsonl files or run folders for the training curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .summary import markdown_table, summary_table

    formats = [f.strip() for f in str(args.formats).split(",") if f.strip()]
    start = time.perf_counter()
    written = draw_figures(args.results, args.out, args.style, formats=formats, metrics=args.metrics,
                           column=args.column, show_progress=not args.quiet)
    stems = sorted({p.stem for p in written})
    print(f"wrote {len(written)} files ({len(stems)} figures: {', '.join(stems)}) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(markdown_table(summary_table(args.results)), end="")
    return 0
