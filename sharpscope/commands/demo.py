"""``sharpscope demo``: the whole pipeline on the bundled digits data, in a few minutes on a CPU.

1. Train the digits MLP (64-64-64-10) with SGD, SAM and ZSharp from the same initialisation, with the
   same data order, learning rate, epochs and batch size (SAM and ZSharp with rho = 0.05, ZSharp with
   percentile 0.95), saving checkpoints and ZSharp's mask log in ``--work``, and tracking lambda_max
   once per epoch (:mod:`sharpscope.track`, warm-started Lanczos on the whole training set) into each
   run's ``tracking.jsonl``.
2. Analyse the three checkpoints on the training set (:func:`~sharpscope.commands.analyze_checkpoint`):
   top eigenvalues, trace, spectral density, per-layer curvature, 1-D and 2-D landscapes, Z-score
   distributions, mask statistics, alignment of the ascent directions, sharpness; and the loss and
   accuracy on the straight lines SGD -> ZSharp and SAM -> ZSharp (alpha in [-0.25, 1.25],
   :func:`~sharpscope.commands.analyze.interpolate_checkpoints`).
3. Draw every figure into ``--out`` (default ``runs/demo/figures``, not the committed ``figures/``;
   :func:`~sharpscope.commands.draw_figures`; the tracked lambda_max is ``sharpness_over_training``) and write
   ``summary.md``: test accuracy, lambda_max, trace +- s.e., worst-case and average sharpness.

Nothing is downloaded. ``--quick`` shrinks every budget (for the test suite); its numbers are not
meant to be read.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .._io import atomic_write_text
from ..errors import UserInputError
from ..train.layout import RunLayout
from .analyze import AnalysisOptions

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "zsharp")
#: The end points of the demo's interpolations: each baseline's solution to ZSharp's.
INTERPOLATIONS: tuple[tuple[str, str], ...] = (("sgd", "zsharp"), ("sam", "zsharp"))


@dataclass(frozen=True)
class DemoBudget:
    """Training and analysis budgets of the demo."""

    epochs: int
    batch_size: int
    lr: float
    log_mask_every: int
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    #: Probe examples of the lambda_max tracked once per epoch (the first ones; None: the whole training set).
    track_samples: int | None = None


FULL = DemoBudget(epochs=30, batch_size=64, lr=0.05, log_mask_every=10,
                  analysis=AnalysisOptions(samples=None, batch_size=256, top_k=5, max_iter=300, trace_samples=90,
                                           density_iter=90, density_runs=3, steps_1d=61, grid_2d=31, span=1.0,
                                           sharpness_steps=20, sharpness_samples=50, interp_points=31))
QUICK = DemoBudget(epochs=2, batch_size=128, lr=0.05, log_mask_every=4,
                   analysis=AnalysisOptions(samples=256, batch_size=128, top_k=3, max_iter=60, trace_samples=12,
                                            density_iter=16, density_runs=1, steps_1d=9, grid_2d=7, span=1.0,
                                            sharpness_steps=3, sharpness_samples=4, interp_points=7),
                   track_samples=128)


@functools.cache
def _train_size() -> int:
    from ..data import load_dataset

    return len(load_dataset("digits", train=True))


def _train_config(optimizer: str, budget: DemoBudget, seed: int, show_progress: bool) -> Any:
    from ..train import TrainConfig
    from ..train.loop import steps_per_epoch

    return TrainConfig(optimizer=optimizer, base="sgd", lr=budget.lr, momentum=0.9, weight_decay=5e-4,
                       epochs=budget.epochs, batch_size=budget.batch_size, schedule="cosine", seed=seed,
                       device="cpu", log_mask_every=budget.log_mask_every if optimizer == "zsharp" else 0,
                       track="lambda_max", track_every=steps_per_epoch(_train_size(), budget.batch_size),
                       track_samples=budget.track_samples or _train_size(), progress=show_progress)


def _same_run(folder: Path, config: Any) -> bool:
    """True when ``folder`` already holds a finished demo run with exactly this configuration (all its
    epochs: a run killed midway is trained again, not reused)."""
    from ..train.checkpoint import load_checkpoint

    layout = RunLayout(folder)
    try:
        saved = json.loads(layout.config.read_text())["config"]
        if not layout.last.is_file() or saved != json.loads(json.dumps(config.to_dict(), default=str)):
            return False
        return int(load_checkpoint(layout.last).epoch) >= int(config.epochs)
    except (OSError, ValueError, KeyError, TypeError, UserInputError):
        return False


def _run_files(layout: RunLayout) -> list[Path]:
    """The files ``fit`` writes into a run folder (checkpoints, logs, configuration)."""
    return [layout.last, layout.best, layout.metrics, layout.masks, layout.config, layout.tracking,
            *(path for _, path in layout.epoch_checkpoints()), *layout.stale_temporaries()]


def _train(optimizer: str, folder: Path, budget: DemoBudget, seed: int, show_progress: bool) -> Path:
    from ..data import load_dataset
    from ..models import build_model
    from ..train import fit

    config = _train_config(optimizer, budget, seed, show_progress)
    layout = RunLayout(folder)
    if _same_run(folder, config):
        print(f"demo: reusing the {optimizer} run in {folder} (same settings)", file=sys.stderr)
        return layout.last
    for path in _run_files(layout):  # a stale demo run with other settings: only the files fit writes
        path.unlink(missing_ok=True)
    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    torch.manual_seed(seed)  # the same initialisation for every optimizer
    model = build_model("mlp", train.num_classes, in_features=64)
    fit(model, train, test, config, out=folder, metadata={"dataset": "digits", "demo": True})
    return layout.last


#: Where the demo writes by default: a folder of its own, never the committed gallery ``figures/``.
DEFAULT_OUT = "runs/demo/figures"


def run_demo(out_dir: str | Path = DEFAULT_OUT, work_dir: str | Path = "runs/demo", *, quick: bool = False,
             style: str = "neurips", seed: int = 0, formats: tuple[str, ...] = ("pdf", "png"),
             show_progress: bool = True) -> pd.DataFrame:
    """Train SGD, SAM and ZSharp on digits, analyse the checkpoints, draw the figures, write ``summary.md``.

    Args:
        out_dir: folder of the figures and ``summary.md``.
        work_dir: folder of the runs (``<work>/<optimizer>/``) and results (``<work>/results``); a run
            already there with the same settings is reused, one with other settings is replaced.
        quick: tiny budgets (seconds; for tests).
        style: venue of the figures.
        seed: initialisation, data order and analysis seed.
        formats: figure formats.
        show_progress: progress bars.

    Returns:
        The summary table (one row per optimizer), also written to ``<out_dir>/summary.md``.
    """
    from ..data import load_dataset
    from .analyze import ANALYSES, analyze_checkpoint, interpolate_checkpoints, sample_batches
    from .figures import draw_figures
    from .summary import markdown_table, summary_table

    budget = QUICK if quick else FULL
    work, out = Path(work_dir), Path(out_dir)
    for path, what in ((work, "--work"), (out, "--out")):
        if path.exists() and not path.is_dir():
            raise UserInputError(f"{what} {str(path)!r} is a file; give a folder")
    if work.resolve() == out.resolve():
        raise UserInputError("--work and --out must be different folders (runs and results are not figures)")
    start = time.perf_counter()
    checkpoints = {}
    reused = all(_same_run(work / o, _train_config(o, budget, seed, show_progress)) for o in OPTIMIZERS)
    for optimizer in OPTIMIZERS:
        print(f"demo: training {optimizer} ({budget.epochs} epochs)", file=sys.stderr)
        checkpoints[optimizer] = _train(optimizer, work / optimizer, budget, seed, show_progress)
    trained = time.perf_counter()
    results = work / "results"
    for stale in results.glob("*__*.nc") if results.is_dir() else []:
        stale.unlink()
    options = AnalysisOptions(**{**budget.analysis.__dict__, "seed": seed})
    train = sample_batches(load_dataset("digits", train=True), options.samples, options.batch_size, options.seed)
    for optimizer, path in checkpoints.items():
        print(f"demo: analysing {optimizer}", file=sys.stderr)
        analyze_checkpoint(path, train, ANALYSES, results, name=optimizer, options=options,
                           show_progress=show_progress)
    for a, b in INTERPOLATIONS:
        print(f"demo: interpolating {a} -> {b}", file=sys.stderr)
        interpolate_checkpoints(checkpoints[a], checkpoints[b], train, results, names=(a, b), options=options,
                                show_progress=show_progress)
    analysed = time.perf_counter()
    written = draw_figures(results, out, style, formats=formats, show_progress=show_progress)
    table = summary_table(results)
    elapsed = time.perf_counter() - start
    header = (f"# sharpscope demo{' (quick)' if quick else ''}\n\n"
              f"Digits MLP (64-64-64-10), {budget.epochs} epochs, batch {budget.batch_size}, SGD base "
              f"(lr {budget.lr}, momentum 0.9, cosine schedule), seed {seed}; SAM and ZSharp with rho = "
              f"{options.rho}, ZSharp percentile {options.percentile}. Curvature and sharpness on "
              f"{'all' if options.samples is None else options.samples} training examples; sharpness radius "
              f"rho = {options.rho} (worst case: {options.sharpness_steps} ascent steps; average: "
              f"{options.sharpness_samples} random directions).\n\n")
    # no wall time in the file: the same settings give the same summary.md on every machine
    atomic_write_text(out / "summary.md", header + markdown_table(table))
    print(f"demo: {len(written)} figure files and summary.md in {out} ({elapsed:.0f} s: training "
          f"{trained - start:.0f} s{' (runs reused from ' + str(work) + ')' if reused else ''}, analysis "
          f"{analysed - trained:.0f} s)", file=sys.stderr)
    return table


# --- the command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the figures and summary.md (default: {DEFAULT_OUT}; the committed "
                             "gallery figures/ is only rewritten when asked for)")
    parser.add_argument("--work", default="runs/demo", help="folder for checkpoints and results (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke test (about a minute)")
    parser.add_argument("--style", default="neurips", help="figure style: neurips (default), icml, iclr, paper")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, analyses (0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..plot import VENUES
    from .summary import markdown_table

    if str(args.style).lower() not in VENUES:  # before minutes of training
        raise UserInputError(f"unknown style {args.style!r}; choose one of: {', '.join(sorted(VENUES))}")
    if args.seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {args.seed}")
    table = run_demo(args.out, args.work, quick=args.quick, style=args.style, seed=args.seed,
                     show_progress=not args.quiet and sys.stderr.isatty())
    print(markdown_table(table), end="")
    return 0
