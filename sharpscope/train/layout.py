"""The files of a run folder, named in one place.

A run folder written by ``sharpscope train`` (or :func:`~sharpscope.train.fit` with ``out=``) holds:

- ``last.pt``: the latest checkpoint (resume from it); ``best.pt``: the best by test accuracy;
  ``epoch_KKKK.pt``: every ``save_every`` epochs;
- ``metrics.jsonl``: one JSON object per epoch; ``masks.csv``: ZSharp's per-layer mask statistics;
- ``config.json``: the training configuration; ``run.lock``: held while a process writes the run;
- ``tracking.jsonl``: the sharpness tracker's rows (``--track``).

Every module that reads or writes a run folder goes through :class:`RunLayout` instead of spelling
these names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass(frozen=True)
class RunLayout:
    """Paths of the files in one run folder (nothing is created or read here)."""

    folder: Path

    LAST = "last.pt"
    BEST = "best.pt"
    METRICS = "metrics.jsonl"
    MASKS = "masks.csv"
    CONFIG = "config.json"
    LOCK = "run.lock"
    TRACKING = "tracking.jsonl"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "folder", Path(folder))

    @classmethod
    def of_checkpoint(cls, checkpoint_path: str | os.PathLike[str]) -> RunLayout:
        """The layout of the folder that holds ``checkpoint_path``."""
        return cls(Path(checkpoint_path).parent)

    @property
    def last(self) -> Path:
        return self.folder / self.LAST

    @property
    def best(self) -> Path:
        return self.folder / self.BEST

    @property
    def metrics(self) -> Path:
        return self.folder / self.METRICS

    @property
    def masks(self) -> Path:
        return self.folder / self.MASKS

    @property
    def config(self) -> Path:
        return self.folder / self.CONFIG

    @property
    def tracking(self) -> Path:
        """Rows of the sharpness tracker (``sharpscope.track``), one JSON object per measure and event."""
        return self.folder / self.TRACKING

    @property
    def lock(self) -> Path:
        return self.folder / self.LOCK

    def epoch(self, k: int) -> Path:
        """The checkpoint kept after epoch ``k`` (``epoch_0005.pt``)."""
        return self.folder / f"epoch_{int(k):04d}.pt"

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of every ``epoch_KKKK.pt`` present, by epoch."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
        return sorted(found)

    def stale_temporaries(self) -> list[Path]:
        """Temporary files left by an interrupted atomic write (``.NAME.*.tmp``)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
