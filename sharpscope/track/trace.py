"""``trace``: ``tr(H)`` of the probe loss by Hutch++ with a small fixed budget, and its standard error.

Uses :func:`sharpscope.analysis.hessian.trace_estimate` (Hutch++: a third of the budget sketches
``Q = orth(H S)``, a third computes ``tr(Q^T H Q)``, the rest is Hutchinson on the deflated remainder;
the standard error is that of the Hutchinson part). The probes come from the same seed at every event
(common random numbers), so the change between events is not buried in the probes' own noise.
"""

from __future__ import annotations

from .._validate import integer
from ..analysis.hessian import trace_estimate
from .measure import Event, Measure
from .rows import TrackRow


class Trace(Measure):
    """Hutch++ trace estimate with ``n_hvp`` products per event (at least 4); row: value, stderr, n_hvp."""

    name = "trace"

    def __init__(self, every: int | None = None, n_hvp: int = 15, seed: int = 0) -> None:
        super().__init__(every)
        self.n_hvp = integer(n_hvp, "trace n_hvp", minimum=4)
        self.seed = integer(seed, "seed", minimum=None)

    def measure(self, event: Event) -> TrackRow:
        est = trace_estimate(event.operator(), self.n_hvp, "hutch++", self.seed)
        return TrackRow(event.step, self.name, {"value": est.estimate, "stderr": est.stderr, "n_hvp": est.n_hvp})
