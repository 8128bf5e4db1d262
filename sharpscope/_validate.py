"""One validator for the numbers users pass: integers, positive numbers, fractions, choices.

Every check raises :class:`~sharpscope.errors.UserInputError` (a ``ValueError``) with one line that
names the argument, says what it must be and shows what was given, so the CLI prints it as one
line with exit code 2 and Python callers can catch ``ValueError`` as before.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from .errors import UserInputError


def integer(value: Any, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserInputError(f"{name} must be an integer{_bounds(minimum, maximum)}; got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UserInputError(f"{name} must be an integer{_bounds(minimum, maximum)}; got {value}")
    return value


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1."""
    return integer(value, name, minimum=1)


def number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None,
           strict_minimum: bool = False, strict_maximum: bool = False) -> float:
    """``value`` as a finite ``float`` in the given range (open at an end marked ``strict_*``)."""
    bounds = _bounds(minimum, maximum, strict_minimum, strict_maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UserInputError(f"{name} must be a finite number{bounds}; got {value!r}")
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if strict_minimum else value < minimum)
    high_bad = maximum is not None and (value >= maximum if strict_maximum else value > maximum)
    if low_bad or high_bad:
        raise UserInputError(f"{name} must be a number{bounds}; got {value!r}")
    return value


def positive_number(value: Any, name: str) -> float:
    """``value`` as a finite ``float`` > 0."""
    return number(value, name, minimum=0.0, strict_minimum=True)


def fraction(value: Any, name: str) -> float:
    """``value`` as a finite ``float`` in ``[0, 1]``."""
    return number(value, name, minimum=0.0, maximum=1.0)


def open_fraction(value: Any, name: str) -> float:
    """``value`` as a finite ``float`` in the open interval ``(0, 1)``."""
    return number(value, name, minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True)


def choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed`` (the message lists them)."""
    if value not in allowed:
        raise UserInputError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _bounds(minimum: float | None, maximum: float | None, strict_minimum: bool = False,
            strict_maximum: bool = False) -> str:
    low = None if minimum is None else f"{'>' if strict_minimum else '>='} {minimum:g}"
    high = None if maximum is None else f"{'<' if strict_maximum else '<='} {maximum:g}"
    parts = [p for p in (low, high) if p]
    return (" " + " and ".join(parts)) if parts else ""
