"""TensorBoard logger (``torch.utils.tensorboard``): every value a scalar, Z-score histograms per layer.

Tags: ``<measure>/<key>`` for a row's values (``lambda_max/value``, ``lambda_max/threshold``) and
``<measure>.<key>/<layer>`` for per-layer values, so each per-layer quantity of every layer shares one
TensorBoard section (``masks.kept_fraction/...``); histograms as ``<measure>.hist/<layer>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..rows import TrackRow
from .base import Logger, missing_package


class TensorBoardLogger(Logger):
    """Write rows as TensorBoard events under ``log_dir`` (``purge_step`` when resuming)."""

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard", "tensorboard") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, rows: Sequence[TrackRow]) -> None:
        for row in rows:
            for tag, value in row.scalars().items():
                self.writer.add_scalar(tag, value, global_step=row.step)
            for layer, (edges, counts) in row.histograms.items():
                self._histogram(f"{row.measure}.hist/{layer}", edges, counts, row.step)

    def _histogram(self, tag: str, edges: np.ndarray, counts: np.ndarray, step: int) -> None:
        """A histogram from bin counts (the raw values are not kept): centres stand for their bins."""
        n = float(counts.sum())
        if n == 0:
            return
        centres = 0.5 * (edges[:-1] + edges[1:])
        used = np.nonzero(counts)[0]
        self.writer.add_histogram_raw(
            tag, min=float(edges[used[0]]), max=float(edges[used[-1] + 1]), num=n,
            sum=float((centres * counts).sum()), sum_squares=float((centres**2 * counts).sum()),
            bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
