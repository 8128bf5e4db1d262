"""Training: :func:`fit` (the loop), checkpoints, metrics logs and the ``sharpscope train`` command."""

from __future__ import annotations

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import OPTIMIZER_NAMES, PAPER_PRESET, RESUMABLE_FIELDS, TrainConfig, build_optimizer, lr_factor
from .layout import RunLayout
from .loop import FitResult, TrainingDiverged, evaluate, fit
from .metrics import read_metrics
from .run_folder import RunFolder

__all__ = ["Checkpoint", "FitResult", "OPTIMIZER_NAMES", "PAPER_PRESET", "RESUMABLE_FIELDS", "RunFolder", "RunLayout",
           "TrainConfig", "TrainingDiverged", "build_optimizer", "evaluate", "fit", "load_checkpoint", "lr_factor",
           "read_metrics", "save_checkpoint"]
