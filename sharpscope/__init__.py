"""sharpscope: sharpness-aware training (ZSharp, SAM, ASAM, Friendly-SAM) and sharpness analysis.

The public API is re-exported here (see DESIGN.md); importing changes no global state. The plotting
helpers ``style`` and ``save_figure`` are loaded on first use so that ``import sharpscope`` does not
import matplotlib.
"""

import os
from pathlib import Path
from typing import Any

from ._version import __version__
from .analysis.curvature import HessianOperator
from .analysis.directions import (
    Direction,
    TrajectoryDirections,
    eigen_directions,
    interpolation_direction,
    random_directions,
    trajectory_directions,
)
from .analysis.gradients import ZScoreResult, gradient_zscores, load_zscores
from .analysis.hessian import (
    DensityResult,
    EigenResult,
    LayerCurvatureResult,
    TraceResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    layer_curvature,
    load_layer_curvature,
    save_layer_curvature,
)
from .analysis.landscape import Landscape, interpolate, landscape_1d, landscape_2d
from .analysis.masks import (
    AlignmentResult,
    MaskStatisticsResult,
    ZSharpMasks,
    load_mask_log,
    load_mask_statistics,
    mask_statistics,
    perturbation_alignment,
    save_mask_statistics,
    zsharp_masks,
)
from .analysis.results import Result, TableResult
from .analysis.sharpness import SharpnessResult, sharpness
from .data import DATASET_NAMES, TensorData, load_dataset
from .models import MODEL_NAMES, build_model
from .optim import (
    ASAM,
    OPTIMIZER_ORDER,
    SAM,
    FriendlySAM,
    ZSharp,
    ZSharpAscent,
    frozen_running_stats,
    zsharp_ascent,
)
from .threads import fixed_threads, thread_policy
from .train import Checkpoint, TrainConfig, fit, load_checkpoint

_LAZY_PLOT = ("style", "save_figure")


def load(path: str | os.PathLike[str]) -> Any:
    """Open any sharpscope file: a result file (by the kind stored inside) or a checkpoint (``.pt``).

    Returns the result object (``EigenResult``, ``Landscape``, ...) or a :class:`Checkpoint`.
    """
    from .analysis.results import load_result

    if Path(path).suffix == ".pt":
        return load_checkpoint(path)
    return load_result(path)
_LAZY_COMMANDS = ("analyze_checkpoint", "draw_figures", "run_demo", "summary_table")


def __getattr__(name: str) -> Any:
    if name in _LAZY_PLOT:
        from . import plot

        return getattr(plot, name)
    if name in _LAZY_COMMANDS:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'sharpscope' has no attribute {name!r}")


__all__ = [
    "ASAM",
    "SAM",
    "AlignmentResult",
    "MaskStatisticsResult",
    "ZSharpMasks",
    "Checkpoint",
    "DATASET_NAMES",
    "MODEL_NAMES",
    "TensorData",
    "TrainConfig",
    "DensityResult",
    "Direction",
    "TrajectoryDirections",
    "EigenResult",
    "FriendlySAM",
    "HessianOperator",
    "Landscape",
    "LayerCurvatureResult",
    "Result",
    "SharpnessResult",
    "TableResult",
    "TraceResult",
    "ZSharp",
    "ZSharpAscent",
    "OPTIMIZER_ORDER",
    "fixed_threads",
    "thread_policy",
    "zsharp_ascent",
    "ZScoreResult",
    "__version__",
    "analyze_checkpoint",
    "build_model",
    "draw_figures",
    "run_demo",
    "summary_table",
    "eigen_directions",
    "fit",
    "frozen_running_stats",
    "gradient_zscores",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "interpolation_direction",
    "landscape_1d",
    "landscape_2d",
    "layer_curvature",
    "load",
    "load_checkpoint",
    "load_dataset",
    "load_layer_curvature",
    "load_mask_log",
    "load_mask_statistics",
    "load_zscores",
    "save_layer_curvature",
    "save_mask_statistics",
    "mask_statistics",
    "perturbation_alignment",
    "random_directions",
    "save_figure",
    "sharpness",
    "style",
    "trajectory_directions",
    "zsharp_masks",
]
