"""The rows a run tracked while training, as a result file next to its analyses (``<run>__tracking.nc``).

``sharpscope analyze`` copies the ``tracking.jsonl`` of an analysed checkpoint's run folder into the
results folder as a :class:`TrackingResult`, so the tracked figures survive the runs being moved or
deleted. The file holds one tidy long table, one number per line:

=========  ==================================================================================
``row``    position of the tracked row in the log (0-based): keeps the rows in their order
``step``   the optimizer step of the row
``measure`` the measure's name (``lambda_max``, ``masks``, ...)
``layer``  the parameter tensor of a per-layer value (``masks``, ``zscores``); empty for a row's own values
``key``    the value's name (``value``, ``residual``, ``kept_fraction``, ...)
``value``  the number (finite)
=========  ==================================================================================

A row that carries no value at all is kept as one line with an empty ``key`` (and ``value`` NaN), so
the rows read back are the rows written. :meth:`TrackingResult.to_dataframe` and
:meth:`TrackingResult.layer_dataframe` give the frames of :func:`~sharpscope.track.read_tracking` and
:func:`~sharpscope.track.read_tracking_layers` (and of :class:`~sharpscope.track.SharpnessTracker`), so the
plots take a ``TrackingResult`` wherever they take a run folder's rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..analysis.results import TableResult, damaged_result_file, provenance
from .rows import TrackRow, layers_frame, rows_frame

__all__ = ["TRACKING_KIND", "TrackingResult"]

TRACKING_KIND = "tracking"
#: The columns of the stored long table, in order.
COLUMNS = ("row", "step", "measure", "layer", "key", "value")


def long_table(rows: Iterable[TrackRow]) -> pd.DataFrame:
    """The rows as the long table of the module docstring (row's own values first, then per layer)."""
    lines: list[tuple[int, int, str, str, str, float]] = []
    for i, row in enumerate(rows):
        entries = [("", k, v) for k, v in row.values.items()]
        entries += [(layer, k, v) for layer, vals in row.layers.items() for k, v in vals.items()]
        for layer, key, value in entries or [("", "", math.nan)]:
            lines.append((i, int(row.step), row.measure, layer, key, float(value)))
    table = pd.DataFrame(lines, columns=list(COLUMNS))
    return table.astype({"row": np.int64, "step": np.int64, "value": np.float64})


def rows_of(table: pd.DataFrame) -> list[TrackRow]:
    """Inverse of :func:`long_table`: the tracked rows, in their logged order."""
    rows = []
    for _, entries in table.groupby("row", sort=True):
        first = entries.iloc[0]
        values: dict[str, float] = {}
        layers: dict[str, dict[str, float]] = {}
        for layer, key, value in zip(entries["layer"], entries["key"], entries["value"]):
            if key == "":
                continue  # the place holder of a row without values
            (layers.setdefault(str(layer), {}) if layer != "" else values)[str(key)] = float(value)
        rows.append(TrackRow(int(first["step"]), str(first["measure"]), values, layers=layers))
    return rows


class TrackingResult(TableResult):
    """The tracked rows of one run (see the module docstring); ``sharpscope.load`` opens its file.

    ``settings``: ``source`` (the ``tracking.jsonl`` read, absolute), ``run``, ``checkpoint`` (the analysed
    checkpoint's identity, when made by ``analyze``) and ``provenance``.
    """

    KIND: ClassVar[str] = TRACKING_KIND

    def __init__(self, table: pd.DataFrame, settings: dict[str, Any]) -> None:
        table = table.reset_index(drop=True)
        super().__init__(table.astype({"row": np.int64, "step": np.int64, "value": np.float64}), settings)

    @classmethod
    def from_rows(cls, rows: Iterable[TrackRow], settings: dict[str, Any] | None = None) -> TrackingResult:
        """The result of tracked rows (from a :class:`~sharpscope.track.SharpnessTracker` or a log)."""
        return cls(long_table(rows), {**(settings or {}), "provenance": provenance()})

    @classmethod
    def read(cls, path: str | os.PathLike[str], settings: dict[str, Any] | None = None) -> TrackingResult:
        """The rows of a ``tracking.jsonl`` (or of the run folder holding one); bad lines are one
        :class:`~sharpscope.errors.UserInputError`."""
        from ..train.layout import RunLayout
        from .loggers.jsonl import read_rows

        path = Path(path)
        source = RunLayout(path).tracking if path.is_dir() else path
        return cls.from_rows(read_rows(path), {"source": str(source.resolve()), **(settings or {})})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrackingResult:
        """Read a file written by :meth:`save`; a damaged one is one :class:`~sharpscope.errors.UserInputError`."""
        with damaged_result_file(path, cls.KIND):
            return super().load(path)

    def rows(self) -> list[TrackRow]:
        """The tracked rows, in their logged order."""
        return rows_of(self.table)

    @property
    def n_rows(self) -> int:
        """How many rows were tracked (``len(result)`` counts the lines of the long table)."""
        return int(self.table["row"].nunique())

    def to_dataframe(self, measure: str | None = None) -> pd.DataFrame:  # type: ignore[override]
        """One line per tracked row (``step``, ``measure`` and its values), optionally of one measure:
        the frame of :func:`~sharpscope.track.read_tracking` on the log it was read from."""
        return rows_frame(self.rows(), measure)

    def layer_dataframe(self, measure: str | None = None) -> pd.DataFrame:
        """Per-layer values, tidy: ``step, measure, layer, key, value`` (as
        :func:`~sharpscope.track.read_tracking_layers`)."""
        return layers_frame(self.rows(), measure)

    def __repr__(self) -> str:
        measures = ", ".join(dict.fromkeys(self.table["measure"]))
        return f"TrackingResult({self.n_rows} rows of {measures or 'nothing'})"
