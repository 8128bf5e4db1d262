"""Turn what a user hands a plot function into a checked tidy DataFrame.

Plot functions accept a tidy :class:`pandas.DataFrame`, a result object (anything with
``.to_dataframe()``), a list of records, or a mapping ``label -> any of those`` (the label becomes
a column, e.g. ``optimizer``). Missing columns are a :class:`~sharpscope.errors.UserInputError`
naming the argument, the columns needed and the columns found.

Every plot function takes what it draws as its first argument, named ``data`` (as seaborn does);
:func:`data_argument` keeps the names it had before working as deprecated keyword aliases.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ..errors import UserInputError

_F = TypeVar("_F", bound=Callable[..., Any])


def data_argument(*old_names: str) -> Callable[[_F], _F]:
    """Let a plot function's ``data`` also be passed as ``old_name=...`` (its former keyword name).

    The old name still works and warns (``DeprecationWarning``); giving the data twice is a
    ``TypeError``, as Python says for any argument given twice.
    """
    def decorate(func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old in old_names:
                if old not in kwargs:
                    continue
                if args or "data" in kwargs:
                    raise TypeError(f"{func.__name__}() got the data twice: as 'data' and as {old!r}")
                warnings.warn(f"{func.__name__}({old}=...) is deprecated; pass the data first or as data=...",
                              DeprecationWarning, stacklevel=2)
                kwargs["data"] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def to_frame(obj: Any, arg: str) -> pd.DataFrame:
    """One object (DataFrame, result with ``to_dataframe()``, list of dict records) as a DataFrame."""
    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    if hasattr(obj, "to_dataframe"):
        frame = obj.to_dataframe()
        if isinstance(frame, pd.Series):
            frame = frame.reset_index()
        if not isinstance(frame, pd.DataFrame):
            raise UserInputError(f"{arg}: to_dataframe() returned {type(frame).__name__}, not a DataFrame")
        return frame.copy()
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and obj and isinstance(obj[0], Mapping):
        return pd.DataFrame.from_records(list(obj))
    raise UserInputError(
        f"{arg}: expected a pandas DataFrame, a sharpscope result (with .to_dataframe()) or a list of "
        f"records, got {type(obj).__name__}"
    )


def labelled_frame(obj: Any, arg: str, label_column: str, convert=to_frame) -> pd.DataFrame:
    """Like :func:`to_frame`, but a mapping ``{label: obj}`` is stacked with a ``label_column``."""
    if isinstance(obj, Mapping):
        if not obj:
            raise UserInputError(f"{arg}: the mapping is empty; give at least one {label_column}")
        parts = []
        for label, value in obj.items():
            part = convert(value, f"{arg}[{label!r}]")
            part[label_column] = str(label)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)
    return convert(obj, arg)


def require_columns(df: pd.DataFrame, columns: Iterable[str], arg: str) -> pd.DataFrame:
    """Raise a one-line :class:`UserInputError` unless ``df`` has every column in ``columns``."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserInputError(
            f"{arg} is missing column(s) {missing}; it has {list(map(str, df.columns))}"
        )
    if df.empty:
        raise UserInputError(f"{arg} has no rows: nothing to draw")
    return df


def require_finite(values: np.ndarray, arg: str) -> np.ndarray:
    """Raise unless all of ``values`` are finite (a NaN in a figure is a bug upstream, not a dot)."""
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.isfinite(values).sum())
        raise UserInputError(f"{arg} has {bad} non-finite value(s) (NaN/inf); fix the result before plotting")
    return values


def ordered_unique(values: Iterable[Any]) -> list[Any]:
    """Unique values in order of first appearance (layer order in a model, optimizer order given)."""
    return list(dict.fromkeys(values))


def choose(value: str, allowed: Sequence[str], arg: str) -> str:
    """Check a string option against its allowed values."""
    if value not in allowed:
        raise UserInputError(f"{arg} must be one of {list(allowed)}, got {value!r}")
    return value
