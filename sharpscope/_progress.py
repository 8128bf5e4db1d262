"""Progress bars for long work: ``tqdm.auto`` (a widget in notebooks, text in a terminal)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, enabled: bool = True, desc: str | None = None,
             total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar unless ``enabled`` is False (then return it unchanged)."""
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
