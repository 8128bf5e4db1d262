"""Measures and loggers by name, for ``measures=["lambda_max", ...]`` and the CLI's ``--track``/``--log``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..train.layout import RunLayout
from .lambda_max import LambdaMax
from .masks import Masks
from .measure import Measure
from .preconditioned import Preconditioned
from .trace import Trace
from .update_curvature import UpdateCurvature
from .zscores import ZScores

MEASURES: dict[str, type[Measure]] = {m.name: m for m in (LambdaMax, Preconditioned, Trace, UpdateCurvature,
                                                          Masks, ZScores)}
#: Logger names; ``jsonl`` writes ``tracking.jsonl`` into the run folder.
LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")
TRACKING_FILE = RunLayout.TRACKING


def split_names(value: str | Iterable[Any]) -> list[Any]:
    """``"a,b"`` -> ``["a", "b"]``; a list is returned as a list (empty names dropped)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def build_measures(measures: str | Iterable[str | Measure]) -> list[Measure]:
    """Measure instances from names or instances; each name at most once."""
    out: list[Measure] = []
    for m in split_names(measures):
        if isinstance(m, Measure):
            out.append(m)
        elif isinstance(m, str) and m in MEASURES:
            out.append(MEASURES[m]())
        else:
            raise UserInputError(f"unknown measure {m!r}; choose from {', '.join(MEASURES)}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UserInputError(f"each measure may be tracked once; got {names}")
    if not out:
        raise UserInputError(f"no measure to track; choose from {', '.join(MEASURES)}")
    return out


def build_logger(name: str, folder: Path, resume_step: int | None = None, **options: Any) -> Any:
    """A logger by name writing into ``folder`` (``resume_step``: drop what a checkpoint does not hold)."""
    if name == "jsonl":
        from .loggers.jsonl import JsonlLogger

        return JsonlLogger(folder / TRACKING_FILE, resume_step=resume_step)
    if name == "tensorboard":
        from .loggers.tensorboard import TensorBoardLogger

        return TensorBoardLogger(folder / "tensorboard", purge_step=resume_step)
    if name == "mlflow":
        from .loggers.mlflow import MlflowLogger

        return MlflowLogger(folder=folder, **options)
    if name == "wandb":
        from .loggers.wandb import WandbLogger

        return WandbLogger(folder=folder, **options)
    raise UserInputError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
