"""Progress bars for long work: ``tqdm.auto`` (a widget in notebooks, text in a terminal).

A text bar is drawn only on a terminal: when stderr is a file or a pipe (a batch job's log), tqdm's
carriage returns and control sequences would fill it, so the bar is left out (tqdm's ``disable=None``).
``SHARPSCOPE_PROGRESS=always`` in the environment draws it anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm as _tqdm_base
from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, enabled: bool = True, desc: str | None = None,
             total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar unless ``enabled`` is False (then return it unchanged)."""
    if not enabled:
        return iterable
    text_bar = "notebook" not in tqdm.__module__
    if text_bar and os.environ.get("SHARPSCOPE_PROGRESS") != "always":  # only on a terminal
        kwargs.setdefault("disable", None)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)


def close_progress_bars() -> int:
    """Close every open progress bar, innermost first, clearing its line; return how many.

    An exception leaves the bars of the loops it left half-drawn on the terminal; a message printed
    then would start in the middle of one. Call this before printing an error.
    """
    bars = sorted(list(getattr(_tqdm_base, "_instances", ())), key=lambda bar: -abs(getattr(bar, "pos", 0)))
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 -- a bar whose stream is gone must not hide the real error
            pass
    return len(bars)
