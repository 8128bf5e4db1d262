"""One tracked row: what a measure reports at one step, in the form every logger reads.

A :class:`TrackRow` holds the step, the measure's name, its scalar values (``value``, ``residual``,
``n_hvp``, ...), optional per-layer values (``layers[layer][key]``) and optional per-layer histograms
(bin edges and counts, for TensorBoard). Values are finite floats: a quantity that cannot be computed
is left out of the row, never written as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class TrackRow:
    """One measure at one step.

    Attributes:
        step: the optimizer step the row belongs to (0-based).
        measure: the measure's name, e.g. ``"lambda_max"``.
        values: scalar results by name (finite floats).
        layers: per-layer results, ``layers[layer_name][key]``.
        histograms: per-layer ``(edges, counts)`` (not written to JSONL; TensorBoard and W&B draw them).
    """

    step: int
    measure: str
    values: dict[str, float]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reserved = {"step", "measure", "layers"} & set(self.values)
        if reserved:
            raise ValueError(f"value names {sorted(reserved)} are reserved for the row's own fields")
        self.values = _finite(self.values)
        self.layers = {name: _finite(vals) for name, vals in self.layers.items()}

    def scalars(self) -> dict[str, float]:
        """Flat ``tag -> value``: ``measure/key`` and, per layer, ``measure.key/layer``.

        The per-layer tags group one quantity of every layer together (one TensorBoard section each).
        """
        out = {f"{self.measure}/{k}": v for k, v in self.values.items()}
        for layer, vals in self.layers.items():
            out.update({f"{self.measure}.{k}/{layer}": v for k, v in vals.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSONL record: ``step``, ``measure``, the values, and ``layers`` when there are any."""
        record: dict[str, Any] = {"step": self.step, "measure": self.measure, **self.values}
        if self.layers:
            record["layers"] = self.layers
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrackRow:
        """Inverse of :meth:`to_json` (histograms are not stored in JSONL)."""
        record = dict(record)
        step, measure = int(record.pop("step")), str(record.pop("measure"))
        layers = record.pop("layers", {}) or {}
        return cls(step=step, measure=measure, values={k: float(v) for k, v in record.items() if v is not None},
                   layers={n: {k: float(v) for k, v in d.items() if v is not None} for n, d in layers.items()})


def rows_frame(rows: Iterable[TrackRow], measure: str | None = None) -> pd.DataFrame:
    """One line per row (``step``, ``measure`` and the values), optionally for one measure."""
    return pd.DataFrame([{"step": r.step, "measure": r.measure, **r.values} for r in rows
                         if measure is None or r.measure == measure])


def layers_frame(rows: Iterable[TrackRow], measure: str | None = None) -> pd.DataFrame:
    """Per-layer values, tidy: ``step, measure, layer, key, value``."""
    return pd.DataFrame([{"step": r.step, "measure": r.measure, "layer": layer, "key": k, "value": v}
                         for r in rows if measure is None or r.measure == measure
                         for layer, vals in r.layers.items() for k, v in vals.items()],
                        columns=["step", "measure", "layer", "key", "value"])


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """Plain floats, dropping entries that are None or not finite (a row never carries NaN)."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out
