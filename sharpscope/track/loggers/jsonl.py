"""JSONL logger: one JSON object per row in ``tracking.jsonl`` of the run folder, rewritten atomically.

Rows are kept in memory and the whole file is replaced atomically (never a torn line) on
:meth:`JsonlLogger.flush`, at most every ``flush_every_s`` seconds while logging, and on ``close``.
A run resumed from step ``s`` keeps the rows of the steps before ``s`` already on disk
(``resume_step=s``), so its file equals that of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..._io import atomic_write_text, read_json_lines
from ...errors import UserInputError
from ...train.layout import RunLayout
from ..rows import TrackRow, layers_frame, rows_frame
from .base import Logger


def _line(row: TrackRow) -> str:
    return json.dumps(row.to_json(), allow_nan=False) + "\n"


def read_rows(path: str | os.PathLike[str]) -> list[TrackRow]:
    """The rows of a ``tracking.jsonl`` (or of the run folder holding one)."""
    path, lines = read_json_lines(path, RunLayout.TRACKING, "tracking")
    rows = []
    for lineno, obj in lines:
        try:
            rows.append(TrackRow.from_json(obj))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{path}:{lineno} is not a tracking row ({exc})") from None
    return rows


def read_tracking(path: str | os.PathLike[str], measure: str | None = None) -> pd.DataFrame:
    """``tracking.jsonl`` as a DataFrame: one line per row, ``step, measure`` and the values."""
    return rows_frame(read_rows(path), measure)


def read_tracking_layers(path: str | os.PathLike[str], measure: str | None = None) -> pd.DataFrame:
    """Per-layer values of ``tracking.jsonl``, tidy: ``step, measure, layer, key, value``."""
    return layers_frame(read_rows(path), measure)


class JsonlLogger(Logger):
    """Rows as JSON lines in ``path`` (see the module docstring).

    Args:
        path: the file (``<run>/tracking.jsonl``).
        resume_step: keep the rows already in ``path`` whose step is below it (None: start empty).
        flush_every_s: rewrite the file at most this often while logging.
    """

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None,
                 flush_every_s: float = 30.0) -> None:
        self.path = Path(path)
        self.flush_every_s = float(flush_every_s)
        self._lines: list[str] = []
        if resume_step is not None and self.path.is_file():
            self._lines = [_line(r) for r in read_rows(self.path) if r.step < resume_step]
        self._dirty = True
        self._last_flush = time.monotonic()

    def log(self, rows: Sequence[TrackRow]) -> None:
        self._lines.extend(_line(r) for r in rows)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            atomic_write_text(self.path, "".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()
