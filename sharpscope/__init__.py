"""sharpscope: sharpness-aware training (ZSharp, SAM, ASAM, Friendly-SAM) and sharpness analysis.

The public API is re-exported here (see DESIGN.md). Names are loaded on first use (PEP 562), so
``import sharpscope`` and ``sharpscope --version`` do not import torch, and importing changes no
global state.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ._version import __version__ as __version__

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("HessianOperator",), "analysis.curvature"),
    **dict.fromkeys(("Objective", "ClassificationLoss", "TokenCrossEntropy", "ModelOutputLoss", "BatchLoss",
                     "as_objective"), "analysis.objective"),
    **dict.fromkeys(("math_attention",), "analysis.attention"),
    **dict.fromkeys(("GGNOperator",), "analysis.ggn"),
    **dict.fromkeys(("Direction", "TrajectoryDirections", "eigen_directions", "interpolation_direction",
                     "random_directions", "trajectory_directions"), "analysis.directions"),
    **dict.fromkeys(("ZScoreResult", "gradient_zscores", "load_zscores"), "analysis.gradients"),
    **dict.fromkeys(("DensityResult", "EigenResult", "LayerCurvatureResult", "TraceResult", "hessian_density",
                     "hessian_eigenvalues", "hessian_trace", "layer_curvature", "load_layer_curvature",
                     "save_layer_curvature"), "analysis.hessian"),
    **dict.fromkeys(("Landscape", "interpolate", "landscape_1d", "landscape_2d"), "analysis.landscape"),
    **dict.fromkeys(("layer_block", "layer_groups", "layer_kind", "layer_part"), "analysis.layer_groups"),
    **dict.fromkeys(("AlignmentResult", "MaskStatisticsResult", "ZSharpMasks", "load_mask_log",
                     "load_mask_statistics", "mask_statistics", "perturbation_alignment",
                     "save_mask_statistics", "zsharp_masks"), "analysis.masks"),
    **dict.fromkeys(("Result", "TableResult"), "analysis.results"),
    **dict.fromkeys(("SharpnessResult", "sharpness"), "analysis.sharpness"),
    **dict.fromkeys(("DATASET_NAMES", "TensorData", "load_dataset"), "data"),
    **dict.fromkeys(("MODEL_NAMES", "build_model", "hf_model"), "models"),
    **dict.fromkeys(("ASAM", "OPTIMIZER_ORDER", "SAM", "FriendlySAM", "ZSharp", "ZSharpAscent",
                     "frozen_running_stats", "zsharp_ascent"), "optim"),
    **dict.fromkeys(("fixed_threads", "thread_policy"), "threads"),
    **dict.fromkeys(("SharpnessTracker",), "track"),
    **dict.fromkeys(("Checkpoint", "TrainConfig", "fit", "load_checkpoint"), "train"),
    **dict.fromkeys(("style", "save_figure"), "plot"),
    **dict.fromkeys(("analyze_checkpoint", "draw_figures", "run_demo", "summary_table"), "commands"),
}
#: the modules whose result classes ``load`` must know (each registers its kinds on import)
_RESULT_MODULES = ("analysis.hessian", "analysis.sharpness", "analysis.landscape", "analysis.gradients", "track.result",
                   "analysis.masks", "analysis.directions")


def load(path: str | os.PathLike[str]) -> Any:
    """Open any sharpscope file: a result file (by the kind stored inside) or a checkpoint (``.pt``).

    Returns the result object (``EigenResult``, ``Landscape``, ...) or a :class:`Checkpoint`.
    """
    if Path(path).suffix == ".pt":
        return __getattr__("load_checkpoint")(path)
    for module in _RESULT_MODULES:
        importlib.import_module(f".{module}", __name__)
    from .analysis.results import load_result

    return load_result(path)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sharpscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(["__version__", "load", *_EXPORTS])
