"""MLflow logger: every scalar of a row as an MLflow metric at its step, through ``MlflowClient``.

By default the tracking store is a local SQLite file in the run folder (``sqlite:///<run>/mlflow.db``;
MLflow 3 keeps its plain-file store ``./mlruns`` in maintenance mode and refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true``); ``tracking_uri`` selects any other store (a server, ``file:...``),
and ``MLFLOW_TRACKING_URI`` is used when set. The client API is used (not ``mlflow.start_run``), so no
global active run is left behind. ``run_id`` continues an existing run: a resumed training reopens the
run it logged to (its id is in the tracker's state, stored in every checkpoint), sets it running again and
appends to the same metric histories, as ``mlflow.start_run(run_id=...)`` would.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..rows import TrackRow
from .base import Logger, missing_package

_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class MlflowLogger(Logger):
    """Rows as MLflow metrics (see the module docstring).

    Args:
        folder: run folder holding the default SQLite store.
        tracking_uri: explicit store (overrides ``folder`` and ``MLFLOW_TRACKING_URI``).
        experiment: experiment name (created if missing).
        run_name: name of a new run; ``run_id``: log into this existing run instead.
        params: logged once as run parameters (e.g. the tracker's settings).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, tracking_uri: str | None = None,
                 experiment: str = "sharpscope", run_name: str | None = None, run_id: str | None = None,
                 params: Mapping[str, Any] | None = None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise missing_package("mlflow", "mlflow") from None
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            root = Path(folder) if folder is not None else Path.cwd()
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None and not self._reopen(run_id):
            run_id = None  # not in this store (another tracking URI): a new run
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            for key, value in (params or {}).items():
                self.client.log_param(run_id, _key(key), value)
        self.run_id = run_id

    def _reopen(self, run_id: str) -> bool:
        """Mark the existing run ``run_id`` running again; False when this store does not hold it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def resume_state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def log(self, rows: Sequence[TrackRow]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(tag), value, now, row.step) for row in rows for tag, value in row.scalars().items()]
        for start in range(0, len(metrics), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _key(tag: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces; anything else becomes ``_``."""
    return _BAD_KEY.sub("_", tag)
