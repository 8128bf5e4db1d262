"""``sharpscope sweep``: train a grid of runs (optimizers x rho x percentile x seeds), analyse, draw.

The grid: SGD/Adam/AdamW once per seed (they have neither rho nor a percentile); SAM, ASAM and
F-SAM once per (rho, seed); ZSharp once per (rho, percentile, seed). Every run is a folder
``<out>/runs/<optimizer>[_rho<r>][_p<p>]_s<seed>`` written by :func:`~sharpscope.train.fit`, all runs of a
seed from the same initialisation and data order. Then the final checkpoints (``last.pt``) are
analysed into ``<out>/results`` (:func:`~sharpscope.commands.analyze.analyze_checkpoint`) and the
figures drawn into ``<out>/figures`` (:func:`~sharpscope.commands.figures.draw_figures`): seeds
aggregated (mean +- s.d.), test accuracy and lambda_max against rho and against the percentile,
each sharpness measure against the generalization gap with Spearman's rank correlation, and the cost.

Resumable: run it again with the same arguments after an interruption and every finished run is
only checked, a run killed midway continues from its ``last.pt`` (``fit(resume=True)``), and a
run whose result files are newer than its ``last.pt`` is not analysed again.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _validate
from ..errors import UserInputError
from ..train.config import SHARPNESS_AWARE

#: Optimizers that take rho / a percentile (the others get one run per seed).
USES_RHO = SHARPNESS_AWARE
USES_PERCENTILE = ("zsharp",)
#: The result file that shows an analysis was done (the last one it writes).
_DONE_FILE = {"hessian": "layer_curvature", "landscape": "landscape_2d", "zscores": "zscores", "masks": "masks",
              "alignment": "alignment", "sharpness": "sharpness_average"}


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid."""

    optimizer: str
    seed: int
    rho: float | None = None
    percentile: float | None = None

    @property
    def name(self) -> str:
        """Folder and result name: ``zsharp_rho0.05_p0.95_s0``."""
        parts = [self.optimizer]
        if self.rho is not None:
            parts.append(f"rho{self.rho:g}")
        if self.percentile is not None:
            parts.append(f"p{self.percentile:g}")
        return "_".join([*parts, f"s{self.seed}"])


def grid(optimizers: Sequence[str], rhos: Sequence[float], percentiles: Sequence[float],
         seeds: Sequence[int]) -> list[GridPoint]:
    """Every run of the sweep, each optimizer with only the hyperparameters it has."""
    points = []
    for opt, seed in itertools.product(optimizers, seeds):
        rho_values = rhos if opt in USES_RHO else [None]
        p_values = percentiles if opt in USES_PERCENTILE else [None]
        points += [GridPoint(opt, seed, r, p) for r, p in itertools.product(rho_values, p_values)]
    return points


def _train_point(point: GridPoint, folder: Path, data: tuple[Any, Any], model_name: str, settings: dict[str, Any],
                 show_progress: bool) -> Path:
    import torch

    from ..models import build_model
    from ..train import TrainConfig, fit
    from ..train.layout import RunLayout

    train, test = data
    extra = {k: v for k, v in (("rho", point.rho), ("percentile", point.percentile)) if v is not None}
    config = TrainConfig(optimizer=point.optimizer, seed=point.seed, device="cpu", progress=show_progress,
                         log_mask_every=0, **settings, **extra)
    torch.manual_seed(point.seed)  # every optimizer of a seed starts from the same weights
    c, h, w = train.image_shape
    kwargs = {"in_features": c * h * w} if model_name == "mlp" else {"in_channels": c}
    model = build_model(model_name, train.num_classes, **kwargs)
    layout = RunLayout(folder)
    if _finished(layout, config):
        return layout.last
    started = layout.last.is_file() or layout.config.is_file()  # continue a run begun before
    fit(model, train, test, config, out=folder, resume=started, metadata={"dataset": train.name, "sweep": True})
    return layout.last


def _finished(layout: Any, config: Any) -> bool:
    """True when the run folder holds this configuration's run with all its epochs (nothing to train)."""
    import json

    from ..train.checkpoint import load_checkpoint

    try:
        saved = json.loads(layout.config.read_text())["config"]
        wanted = json.loads(json.dumps(config.to_dict(), default=str))
        if {**saved, "progress": None} != {**wanted, "progress": None} or not layout.last.is_file():
            return False
        return int(load_checkpoint(layout.last).epoch) >= int(config.epochs)
    except (OSError, ValueError, KeyError, TypeError, UserInputError):
        return False


def _analysed(results: Path, name: str, what: Sequence[str], checkpoint: Path) -> bool:
    """True when every analysis of ``what`` has a result file newer than ``checkpoint``."""
    from .analyze import result_path

    files = [result_path(results, name, _DONE_FILE[w]) for w in what]
    return all(f.is_file() and f.stat().st_mtime >= checkpoint.stat().st_mtime for f in files)


def run_sweep(out: str | Path, *, optimizers: Sequence[str] = ("sgd", "sam", "zsharp"),
              rhos: Sequence[float] = (0.05,), percentiles: Sequence[float] = (0.95,), seeds: Sequence[int] = (0,),
              dataset: str = "digits", model: str = "mlp", epochs: int = 10, batch_size: int = 64, lr: float = 0.05,
              analyses: Sequence[str] = ("hessian", "sharpness"), options: Any = None, figures: bool = True,
              show_progress: bool = True) -> Any:
    """Train, analyse and draw the grid (see the module); return the per-run summary table.

    ``options`` are the analysis budgets (:class:`~sharpscope.commands.analyze.AnalysisOptions`); the
    analyses run on a seeded sample of the training split. Nothing is analysed when ``analyses`` is empty.
    """
    from ..data import canonical_dataset_name, load_dataset
    from ..train.config import OPTIMIZER_NAMES
    from .analyze import AnalysisOptions, analyze_checkpoint, sample_batches
    from .figures import draw_figures
    from .summary import summary_table

    optimizers = [o.lower() for o in optimizers]
    for o in optimizers:
        _validate.choice(o, "optimizer", OPTIMIZER_NAMES)
    for a in analyses:
        _validate.choice(a, "analysis", tuple(_DONE_FILE))
    points = grid(optimizers, [_validate.positive_number(r, "rho") for r in rhos],
                  [_validate.fraction(p, "percentile") for p in percentiles],
                  [_validate.integer(s, "seed", minimum=0) for s in seeds])
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserInputError(f"--out {str(root)!r} is a file; give a folder for the sweep")
    dataset = canonical_dataset_name(dataset)
    data = (load_dataset(dataset, train=True), load_dataset(dataset, train=False))
    settings = {"epochs": _validate.positive_int(epochs, "epochs"), "batch_size": _validate.positive_int(
        batch_size, "batch_size"), "lr": _validate.positive_number(lr, "lr")}
    options = options or AnalysisOptions()
    batches = sample_batches(data[0], options.samples, options.batch_size, options.seed) if analyses else []
    results = root / "results"
    for i, point in enumerate(points, 1):
        print(f"sweep: run {i}/{len(points)} {point.name}", file=sys.stderr, flush=True)
        last = _train_point(point, root / "runs" / point.name, data, model, settings, show_progress)
        if analyses and not _analysed(results, point.name, analyses, last):
            analyze_checkpoint(last, batches, analyses, results, name=point.name, options=options,
                               show_progress=show_progress)
    if analyses and figures:
        draw_figures(results, root / "figures", metrics=[root / "runs" / p.name for p in points],
                     show_progress=show_progress)
    return summary_table(results) if analyses else None


# --- the command ---------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/sweep", help="folder of runs/, results/, figures/ (runs/sweep)")
    parser.add_argument("--optimizers", default="sgd,sam,zsharp", help="comma-separated (default sgd,sam,zsharp)")
    parser.add_argument("--rho", type=_floats, default=[0.05], help="comma-separated radii (default 0.05)")
    parser.add_argument("--percentile", type=_floats, default=[0.95], help="ZSharp percentiles (default 0.95)")
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--dataset", default="digits", help="dataset (default digits)")
    parser.add_argument("--model", default="mlp", help="model (default mlp)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--analyses", default="hessian,sharpness",
                        help="analyses of each final checkpoint, comma-separated; 'none' to only train "
                             "(default hessian,sharpness)")
    parser.add_argument("--samples", type=int, default=512, help="training examples analysed (default 512)")
    parser.add_argument("--no-figures", action="store_true", help="train and analyse only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .analyze import AnalysisOptions
    from .summary import markdown_table, seed_markdown

    analyses = [] if args.analyses.strip().lower() == "none" else [a.strip() for a in args.analyses.split(",") if a.strip()]
    options = AnalysisOptions(samples=_validate.positive_int(args.samples, "--samples"))
    show = not args.quiet and sys.stderr.isatty()  # no bar's control sequences in a log file
    table = run_sweep(args.out, optimizers=[o.strip() for o in args.optimizers.split(",") if o.strip()],
                      rhos=args.rho, percentiles=args.percentile, seeds=args.seeds, dataset=args.dataset,
                      model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      analyses=analyses, options=options, figures=not args.no_figures, show_progress=show)
    if table is not None:
        print(markdown_table(table), end="")
        print()
        print(seed_markdown(table), end="")
    return 0
