""":class:`SharpnessTracker`: curvature measures every N steps of any training loop, handed to loggers.

::

    tracker = SharpnessTracker(model, loss_fn, probe_data, every=100,
                               measures=["lambda_max", "masks"], loggers=["jsonl", "tensorboard"], folder=run)
    for step, (x, y) in enumerate(loader):
        ...                                   # the usual optimizer step(s)
        tracker.step(step, optimizer=opt)     # measures run only on their steps
    tracker.close()

The probe set is fixed (the same examples at every event, materialised once on the model's device);
measures run in eval mode and leave parameters, buffers, ``.grad`` and train/eval flags exactly as they
were (:func:`~sharpscope.analysis.batching.preserved_model_state`); they use their own random
generators, so training with tracking follows the same trajectory as without. :meth:`state_dict`
holds what a resumed run needs (warm-start vectors, counters, the previous weights of
``update_curvature``) so that its rows equal an uninterrupted run's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._validate import choice, integer
from ..analysis.batching import (
    LossFn,
    batch_size,
    model_device,
    prepared_batches,
    preserved_model_state,
    to_device,
)
from ..analysis.curvature import HVP_METHODS
from ..analysis.objective import as_objective
from ..errors import UserInputError
from .measure import Event, Measure
from .registry import build_logger, build_measures, split_names
from .rows import TrackRow, layers_frame, rows_frame

STATE_VERSION = 1


class SharpnessTracker:
    """Track curvature during training (see the module docstring).

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets)`` (mean-reduced), ``loss_fn(model, batch)``, ``"lm"``, ``"hf"``
            or an :class:`~sharpscope.analysis.objective.Objective` (``as_objective``); kept as ``objective``.
        probe_data: the fixed probe set: one batch (``(inputs, targets)`` or a dict of tensors) or an
            iterable of batches (one batch of a few hundred examples makes ``hvp="cached"`` the product
            method); the probe loss is the count-weighted mean over its batches.
        every: default period of the measures (a measure's own ``every`` wins).
        measures: names (``lambda_max, preconditioned, trace, update_curvature, masks, zscores``, or one
            comma-separated string) or :class:`~sharpscope.track.measure.Measure` instances.
        loggers: logger objects (with ``log(rows)``, ``flush()``, ``close()``) or names
            (``jsonl, tensorboard, mlflow, wandb``; names need ``folder``).
        folder: where named loggers write (a run folder); with a folder, ``jsonl`` is always on.
        hvp, dtype: the Hessian-vector product method and precision (see ``HessianOperator``).
        resume_step: when resuming, named loggers drop what they hold from this step on.
        state: a :meth:`state_dict` to continue from (warm-start vectors, counters, and the runs that
            named loggers such as MLflow and W&B reopen instead of starting new ones).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, probe_data: Any, every: int = 100,
                 measures: str | Iterable[str | Measure] = ("lambda_max",), loggers: str | Iterable[Any] = (),
                 *, folder: str | os.PathLike[str] | None = None, hvp: str = "auto", dtype: torch.dtype | None = None,
                 resume_step: int | None = None, state: dict[str, Any] | None = None) -> None:
        self.model = model
        self.loss_fn = self.objective = as_objective(loss_fn, model)
        self.every = integer(every, "every (tracking period in steps)")
        self.hvp = choice(hvp, "hvp", HVP_METHODS)
        self._method: str | None = None if self.hvp == "auto" else self.hvp  # the method "auto" chose
        self.dtype = dtype
        device = model_device(model)
        self.batches = [to_device(b, device) for b in prepared_batches(model, self.objective, probe_data)]
        self.measures = build_measures(measures)
        self.folder = None if folder is None else Path(folder)
        _check_state(state)
        self.named_loggers: dict[str, Any] = {}
        self.loggers = self._loggers(loggers, resume_step, (state or {}).get("loggers") or {})
        self.rows: list[TrackRow] = []
        self._checked = False
        if state is not None:
            self.load_state_dict(state)

    def _loggers(self, loggers: str | Iterable[Any], resume_step: int | None,
                 reopen: dict[str, dict[str, Any]]) -> list[Any]:
        items = split_names(loggers)
        names = [x for x in items if isinstance(x, str)]
        if names and self.folder is None:
            raise UserInputError(f"loggers given by name ({', '.join(names)}) need folder= (where they write)")
        if self.folder is not None and "jsonl" not in names:
            names.insert(0, "jsonl")
        if self.folder is not None:
            for n in dict.fromkeys(names):
                self.named_loggers[n] = build_logger(n, self.folder, resume_step, **reopen.get(n, {}))
        return list(self.named_loggers.values()) + [x for x in items if not isinstance(x, str)]

    @property
    def n_samples(self) -> int:
        """Number of probe examples."""
        return sum(batch_size(b) for b in self.batches)

    def due(self, step: int) -> bool:
        """Whether some measure runs after optimizer step ``step``."""
        return any(m.due(step, self.every) for m in self.measures)

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[TrackRow]:
        """Call after optimizer step ``step`` (0-based); runs the due measures and logs their rows."""
        step = integer(step, "step", minimum=0)
        if not self._checked:
            for m in self.measures:
                m.check(optimizer)
            self._checked = True
        due = [m for m in self.measures if m.due(step, self.every)]
        rows = self._run(step, due, optimizer) if due else []
        for m in self.measures:
            m.after_step(self.model, step, self.every)
        if rows:
            self.rows.extend(rows)
            for logger in self.loggers:
                logger.log(rows)
        return rows

    def _run(self, step: int, due: Sequence[Measure], optimizer: torch.optim.Optimizer | None) -> list[TrackRow]:
        event = Event(step, self.model, self.loss_fn, self.batches, optimizer, self._method or self.hvp, self.dtype)
        rows = []
        with preserved_model_state(self.model, train=False):
            try:
                for m in due:
                    row = m.measure(event)
                    if row is not None:
                        rows.append(row)
                # "auto" times the product methods when the probe has several batches: once per tracker
                self._method = self._method or event.method()
            finally:
                event.close()
        return rows

    # -- results ---------------------------------------------------------------------------------------
    def to_dataframe(self, measure: str | None = None) -> pd.DataFrame:
        """One line per row (``step``, ``measure`` and the values), optionally for one measure."""
        return rows_frame(self.rows, measure)

    def layer_dataframe(self, measure: str | None = None) -> pd.DataFrame:
        """Per-layer values, tidy: ``step, measure, layer, key, value``."""
        return layers_frame(self.rows, measure)

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors, counters and previous weights of every measure (CPU tensors)."""
        return {"version": STATE_VERSION, "measures": {m.name: m.state_dict() for m in self.measures},
                "loggers": {n: lg.resume_state() for n, lg in self.named_loggers.items()
                            if hasattr(lg, "resume_state") and lg.resume_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (measures not in ``state`` start fresh; the loggers' runs are
        reopened only by the constructor's ``state=``)."""
        _check_state(state, required=True)
        for m in self.measures:
            if m.name in state["measures"]:
                m.load_state_dict(state["measures"][m.name])

    # -- loggers -------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the loggers buffer (the JSONL file is rewritten atomically)."""
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        """Flush and close every logger."""
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> SharpnessTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SharpnessTracker(every={self.every}, measures={[m.name for m in self.measures]}, "
                f"samples={self.n_samples}, loggers={[type(lg).__name__ for lg in self.loggers]})")


def _check_state(state: Any, required: bool = False) -> None:
    if (state is not None or required) and (not isinstance(state, dict) or state.get("version") != STATE_VERSION):
        raise UserInputError("tracker state was not written by this version's SharpnessTracker.state_dict()")
