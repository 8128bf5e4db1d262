"""The training logs of a run folder: ``metrics.jsonl`` (one JSON object per epoch) and ``masks.csv``.

``metrics.jsonl`` has the keys of :data:`EPOCH_KEYS`; ``masks.csv`` is tidy, one row per
(logged step, filtered tensor), with ``step`` (the 0-based index of the optimizer step) and
``epoch`` (0-based) followed by the columns of ``ZSharp.mask_stats`` (layer, numel, kept,
kept_fraction, threshold, grad_norm, perturbation_norm, fallback). Both files are rewritten
atomically at the end of each epoch from the in-memory log, so a crash never leaves a torn line;
a resumed run keeps only the mask rows of the steps its checkpoint holds (``step < ckpt.step``).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_write_text, read_json_lines
from ..errors import UserInputError
from ..optim.zsharp import MASK_STATS_COLUMNS
from .layout import RunLayout

METRICS_FILE = RunLayout.METRICS
MASKS_FILE = RunLayout.MASKS
_INTEGER_COLUMNS = ("step", "epoch", "numel", "kept")
EPOCH_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "time_s",
              "images_per_s")


def _plain(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_text(history: list[dict[str, Any]]) -> str:
    """The text of ``metrics.jsonl`` for an epoch history (one JSON object per line)."""
    return "".join(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n" for row in history)


def write_metrics(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Write the epoch history as JSON lines (atomically)."""
    atomic_write_text(path, metrics_text(history))


def read_metrics(path: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` (or a run folder holding one) as a DataFrame, one row per epoch.

    Raises:
        UserInputError: the file is missing or a line is not JSON (the message names the line).
    """
    _, lines = read_json_lines(path, RunLayout.METRICS, "history")
    rows = [row for _, row in lines]
    return pd.DataFrame(rows, columns=list(EPOCH_KEYS) if not rows else None)


class MaskLog:
    """Accumulates ZSharp mask statistics and writes them as one tidy CSV."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._frames: list[pd.DataFrame] = []

    def load(self, up_to_step: int) -> bool:
        """Resume: keep the rows on disk of the steps before ``up_to_step`` (those a checkpoint holds).

        Returns True when the file held rows of later steps (logged by an epoch that was never
        committed), which :meth:`write` then drops from the file.

        Raises:
            UserInputError: the file is not a mask log (unreadable CSV, no integer step/epoch columns).
        """
        self._frames = []
        if self.path is None or not self.path.is_file() or self.path.stat().st_size == 0:
            return False
        frame = self._read()
        kept = frame[frame["step"] < up_to_step]
        self._frames = [kept]
        return len(kept) < len(frame)

    def _read(self) -> pd.DataFrame:
        assert self.path is not None
        try:
            frame = pd.read_csv(self.path)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserInputError(f"{str(self.path)!r} is corrupted ({reason}); restore it, or delete it to resume "
                                 f"without the earlier mask statistics") from None
        missing = [c for c in ("step", "epoch", *MASK_STATS_COLUMNS) if c not in frame]
        torn = [c for c in _INTEGER_COLUMNS if c in frame and not pd.api.types.is_integer_dtype(frame[c])]
        if missing or torn or frame["layer"].isna().any():
            what = (f"no {missing[0]!r} column" if missing else
                    f"a row without an integer {torn[0]!r}" if torn else "a row without a layer name")
            raise UserInputError(f"{str(self.path)!r} is corrupted ({what}); restore it, or delete it to resume "
                                 f"without the earlier mask statistics")
        return frame

    def add(self, step: int, epoch: int, stats: pd.DataFrame) -> None:
        frame = stats.copy()
        frame.insert(0, "epoch", epoch)
        frame.insert(0, "step", step)
        self._frames.append(frame)

    def frame(self) -> pd.DataFrame:
        frames = [f for f in self._frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write(self) -> None:
        """Write the rows atomically; with no rows, remove a file left by an uncommitted epoch."""
        if self.path is None:
            return
        frame = self.frame()
        if frame.empty:
            self.path.unlink(missing_ok=True)
            return
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        atomic_write_text(self.path, buffer.getvalue())
