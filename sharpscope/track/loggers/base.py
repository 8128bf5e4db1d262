"""The one logger interface: ``log(rows)``, ``flush()``, ``close()``.

A logger receives the :class:`~sharpscope.track.rows.TrackRow` objects of one tracking event at a time
(in step order). ``flush`` makes what it has durable; ``close`` flushes and releases files or runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import UserInputError
from ..rows import TrackRow


class Logger:
    """Base class of the tracking loggers (subclasses implement :meth:`log`)."""

    def log(self, rows: Sequence[TrackRow]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make logged rows durable (default: nothing buffered)."""

    def close(self) -> None:
        """Flush and release resources."""
        self.flush()

    def resume_state(self) -> dict[str, Any]:
        """Keyword arguments that reopen the same logged run after a resume (e.g. ``{"run_id": ...}``);
        stored with the tracker's state. Default: nothing (the logger starts afresh)."""
        return {}


def missing_package(package: str, logger: str) -> UserInputError:
    """The one-line error for a logger whose package is not installed."""
    return UserInputError(f"the {logger} logger needs the '{package}' package: pip install 'sharpscope[track]' "
                          f"(or pip install {package}), or drop {logger} from the loggers")
