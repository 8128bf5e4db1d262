"""Weights & Biases logger (only when ``wandb`` is installed; ``mode="offline"`` needs no account).

Every scalar of a row goes to ``run.log(..., step=row.step)``; Z-score histograms as
``wandb.Histogram``. Offline runs are written under ``<folder>/wandb`` and can be uploaded later with
``wandb sync``. ``run_id`` continues that run (``wandb.init(id=..., resume="allow")``): a resumed training
logs into the run it started (the id is in the tracker's state, stored in every checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..rows import TrackRow
from .base import Logger, missing_package


class WandbLogger(Logger):
    """Rows to a W&B run (``mode``: ``"offline"`` by default, or ``"online"``)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, project: str = "sharpscope",
                 mode: str = "offline", run_name: str | None = None, params: Mapping[str, Any] | None = None,
                 run: Any = None, run_id: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise missing_package("wandb", "wandb") from None
        self._wandb = wandb
        if run is None:
            root = Path(folder) if folder is not None else Path.cwd()
            root.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, mode=mode, dir=str(root), name=run_name, config=dict(params or {}),
                             reinit="create_new", id=run_id, resume="allow" if run_id is not None else None)
        self.run = run

    def resume_state(self) -> dict[str, Any]:
        run_id = getattr(self.run, "id", None)
        return {} if run_id is None else {"run_id": str(run_id)}

    def log(self, rows: Sequence[TrackRow]) -> None:
        by_step: dict[int, dict[str, Any]] = {}
        for row in rows:
            data = by_step.setdefault(row.step, {})
            data.update(row.scalars())
            for layer, (edges, counts) in row.histograms.items():
                data[f"{row.measure}.hist/{layer}"] = self._wandb.Histogram(np_histogram=(counts, edges))
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step, commit=True)

    def close(self) -> None:
        self.run.finish()
