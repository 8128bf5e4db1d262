"""The training logs of a run folder: ``metrics.jsonl`` (one JSON object per epoch) and ``masks.csv``.

``metrics.jsonl`` has the keys of :data:`EPOCH_KEYS`; ``masks.csv`` is tidy, one row per
(logged step, filtered tensor), with ``step`` and ``epoch`` followed by the columns of
``ZSharp.mask_stats`` (layer, numel, kept, kept_fraction, threshold, grad_norm,
perturbation_norm, fallback). Both files are rewritten atomically at the end of each epoch from
the in-memory log, so a crash never leaves a torn line and a resumed run starts from exactly the
epochs its checkpoint holds.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_write_text
from ..errors import UserInputError

METRICS_FILE = "metrics.jsonl"
MASKS_FILE = "masks.csv"
EPOCH_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "time_s",
              "images_per_s")


def _plain(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Write the epoch history as JSON lines (atomically)."""
    lines = [json.dumps({k: _plain(v) for k, v in row.items()}) for row in history]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_metrics(path: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` (or a run folder holding one) as a DataFrame, one row per epoch.

    Raises:
        UserInputError: the file is missing or a line is not JSON (the message names the line).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserInputError(f"history file not found: {path} (expected a metrics.jsonl or a run folder)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
    return pd.DataFrame(rows, columns=list(EPOCH_KEYS) if not rows else None)


class MaskLog:
    """Accumulates ZSharp mask statistics and writes them as one tidy CSV."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._frames: list[pd.DataFrame] = []

    def load(self, up_to_step: int) -> None:
        """Resume: keep the rows already on disk whose step is at most ``up_to_step``."""
        if self.path is not None and self.path.is_file() and self.path.stat().st_size > 0:
            frame = pd.read_csv(self.path)
            if "step" in frame:
                self._frames = [frame[frame["step"] <= up_to_step]]

    def add(self, step: int, epoch: int, stats: pd.DataFrame) -> None:
        frame = stats.copy()
        frame.insert(0, "epoch", epoch)
        frame.insert(0, "step", step)
        self._frames.append(frame)

    def frame(self) -> pd.DataFrame:
        frames = [f for f in self._frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write(self) -> None:
        if self.path is None or not self._frames:
            return
        buffer = io.StringIO()
        self.frame().to_csv(buffer, index=False)
        atomic_write_text(self.path, buffer.getvalue())
