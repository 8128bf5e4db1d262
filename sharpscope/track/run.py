"""Tracking inside a run folder: the probe set of a training dataset and a tracker built from CLI-style options.

``fit`` and ``sharpscope train --track lambda_max,trace,masks --track-every 200 --track-samples 512
--log tensorboard,mlflow`` build their tracker with :func:`run_tracker`: the probe set is the first
``samples`` training examples (normalised as the model sees them, no augmentation, one batch on the
model's device), ``jsonl`` always writes ``<run>/tracking.jsonl``, and on resume the loggers drop what
the checkpoint does not hold (``resume_step``) while :meth:`SharpnessTracker.load_state_dict` restores
the warm-start vectors and counters stored in the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._validate import integer
from ..analysis.batching import LossFn, as_batches, first_samples, model_device, to_device
from ..errors import UserInputError
from .registry import LOGGERS, MEASURES, split_names
from .tracker import SharpnessTracker

#: Defaults a user can leave on: cheap enough at a few hundred steps between events.
DEFAULT_EVERY = 200
DEFAULT_SAMPLES = 512


def probe_batch(data: Any, samples: int, device: torch.device) -> Any:
    """The probe set: the first ``samples`` examples of a :class:`~sharpscope.data.TensorData`, normalised, on
    ``device``, as one ``(x, y)`` batch; or, for batches (a list, as :func:`fit` takes them from its data), the
    first batches holding ``samples`` examples (the last one cut)."""
    samples = integer(samples, "track samples")
    if not hasattr(data, "normalized"):
        return [to_device(b, device) for b in first_samples(as_batches(data), samples)]
    n = min(samples, len(data.targets))
    return data.normalized(data.inputs[:n].to(device)), data.targets[:n].to(device)


def parse_names(value: str | None, allowed: Any, what: str) -> list[str]:
    """``"a,b"`` checked against ``allowed`` (one line naming the bad entry)."""
    names = split_names(value or "")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UserInputError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
    return names


def run_tracker(model: nn.Module, loss_fn: LossFn, train_data: Any, folder: str | os.PathLike[str] | None, *,
                track: str = "lambda_max", every: int = DEFAULT_EVERY, samples: int = DEFAULT_SAMPLES,
                log: str = "", resume_step: int | None = None, state: dict[str, Any] | None = None
                ) -> SharpnessTracker:
    """A tracker for a training run writing into ``folder`` (see the module docstring).

    Args:
        track: comma-separated measure names.
        every: tracking period in optimizer steps.
        samples: probe examples (the first ones of ``train_data``).
        log: comma-separated extra loggers (``tensorboard, mlflow, wandb``); JSONL is always on.
        folder: the run folder (None: rows only in memory, ``tracker.rows``).
        resume_step, state: when resuming, the checkpoint's step and the tracker state it stored.
    """
    measures = parse_names(track, MEASURES, "measure")
    loggers = parse_names(log, LOGGERS, "logger")
    probe = probe_batch(train_data, samples, model_device(model))
    return SharpnessTracker(model, loss_fn, probe, every=every, measures=measures, loggers=loggers,
                            folder=folder, resume_step=resume_step, state=state)
