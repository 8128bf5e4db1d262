"""Sharpness during training: :class:`SharpnessTracker`, its measures and its loggers.

Measures (by name): ``lambda_max`` (warm-started Lanczos), ``preconditioned`` (top eigenvalue of
``P^-1 H`` for Adam-type optimizers, of ``H`` for SGD, with the edge-of-stability threshold), ``trace``
(Hutch++), ``update_curvature`` (second difference along the last update), ``masks`` (ZSharp's
per-layer filter statistics) and ``zscores`` (per-layer kurtosis and tail mass of gradient Z-scores).
Loggers: ``jsonl`` (always, in the run folder), ``tensorboard``, ``mlflow``, ``wandb``; the last three
need ``pip install 'sharpscope[track]'`` (W&B: ``pip install wandb``).
"""

from .lambda_max import LambdaMax, WarmStartLanczos
from .loggers import JsonlLogger, Logger, read_tracking, read_tracking_layers
from .masks import Masks
from .measure import Event, Measure
from .preconditioned import Preconditioned
from .registry import LOGGERS, MEASURES, TRACKING_FILE
from .rows import TrackRow
from .stability import stability_threshold
from .trace import Trace
from .tracker import SharpnessTracker
from .update_curvature import UpdateCurvature
from .zscores import ZScores

__all__ = ["SharpnessTracker", "TrackRow", "Measure", "Event", "LambdaMax", "Preconditioned", "Trace",
           "UpdateCurvature", "Masks", "ZScores", "WarmStartLanczos", "Logger", "JsonlLogger", "read_tracking",
           "read_tracking_layers", "MEASURES", "LOGGERS", "TRACKING_FILE", "stability_threshold"]
