"""What every measure shares: the tracking event it runs in and the small :class:`Measure` interface.

An :class:`Event` is one call of :meth:`SharpnessTracker.step` on a step where some measure is due:
the model (already in eval mode, its state restored afterwards by the tracker), the loss, the fixed
probe batches and the optimizer. Measures that need Hessian-vector products share one
:class:`~sharpscope.analysis.curvature.HessianOperator` per event (:meth:`Event.operator`), so its
graph (``hvp="cached"``) is built once for all of them; ``results`` lets a measure reuse another's
answer from the same event (the preconditioned sharpness of SGD *is* ``lambda_max``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._validate import integer
from ..analysis.batching import Batch, LossFn, first_samples  # noqa: F401 (first_samples: its old home)
from ..analysis.curvature import HessianOperator
from .rows import TrackRow


@dataclass
class Event:
    """One tracking step (see the module docstring)."""

    step: int
    model: nn.Module
    loss_fn: LossFn
    batches: list[Batch]
    optimizer: torch.optim.Optimizer | None = None
    hvp: str = "auto"
    dtype: torch.dtype | None = None
    results: dict[str, Any] = field(default_factory=dict)
    _operator: HessianOperator | None = None

    def operator(self) -> HessianOperator:
        """The Hessian of the probe loss at the current weights, built on first use in this event."""
        if self._operator is None:
            # One process tracks (rank 0 under DDP, the replicas being equal): no collective inside, which
            # the other ranks would never join.
            self._operator = HessianOperator(self.model, self.loss_fn, self.batches, dtype=self.dtype, hvp=self.hvp,
                                             distributed=False)
        return self._operator

    def method(self) -> str | None:
        """The product method this event's operator used (None when no measure needed one)."""
        return None if self._operator is None else self._operator.method

    def close(self) -> None:
        """Free the operator's graph."""
        if self._operator is not None:
            self._operator.close()
            self._operator = None


class Measure:
    """A quantity tracked during training.

    Subclasses set ``name`` and implement :meth:`measure`; those that keep state between events
    (a warm-start vector, the previous weights) implement :meth:`state_dict`/:meth:`load_state_dict`
    so that a resumed run goes on exactly where it stopped.

    Args:
        every: measure on steps that are multiples of ``every`` (default: the tracker's ``every``).
    """

    name: ClassVar[str] = ""

    def __init__(self, every: int | None = None) -> None:
        self.every = None if every is None else integer(every, f"{self.name} every")

    def due(self, step: int, default_every: int) -> bool:
        """Whether this measure runs after optimizer step ``step``."""
        return step % (self.every or default_every) == 0

    def measure(self, event: Event) -> TrackRow | None:
        """The row of this event, or None when there is nothing to report yet."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int, default_every: int) -> None:
        """Called after every tracker step (measured or not); cheap bookkeeping only."""

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Refuse an optimizer this measure cannot read (``UserInputError``), before any work."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"
