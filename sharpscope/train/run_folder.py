"""Writing a run folder so that a process killed at any instant leaves a state resume can finish.

**Commit order of epoch K** (every write is atomic: temporary file, ``fsync``, ``os.replace``):

1. ``masks.csv``: the mask rows up to the end of epoch K;
2. ``last.pt``: the checkpoint of epoch K. This rename is the commit point: epoch K exists from here on;
3. ``best.pt``: the same bytes, if epoch K improved the best score;
4. ``epoch_KKKK.pt``: the same bytes, if ``save_every`` divides K;
5. ``metrics.jsonl``: the rows of epochs 1..K, so it never lists an epoch whose checkpoints are missing.

**Recovery** (:meth:`RunFolder.recover`, run under the lock before training starts or resumes):
temporaries ``.NAME.*.tmp`` of interrupted writes are removed; mask rows of steps the committed
checkpoint does not hold are dropped (a kill between 1 and 2); files 3-5 are completed from the
bytes of ``last.pt`` where they are missing or stale (a kill between 2 and 5). Everything after the
commit point is a function of ``last.pt``, so the folder ends up byte for byte (tensors) and row for
row (logs) as an uninterrupted run leaves it.

**Lock**: one process at a time writes a run folder; :meth:`RunFolder.locked` takes an exclusive,
non-blocking ``flock`` on ``run.lock`` and refuses a second writer with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .._io import atomic_write_bytes
from ..errors import UserInputError
from .layout import RunLayout
from .metrics import MaskLog, metrics_text

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one writer is then the user's care
    fcntl = None  # type: ignore[assignment]


class RunFolder:
    """A run folder written by one process: its lock, its recovery and the commit order of an epoch."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.layout = RunLayout(folder)

    @property
    def folder(self) -> Path:
        return self.layout.folder

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Create the folder and hold an exclusive lock on it for the duration of the block.

        Raises:
            UserInputError: the path is a file, or another process holds the lock.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise UserInputError(f"--out {str(self.folder)!r} is a file; give a folder for the run")
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.layout.lock, "a")  # noqa: SIM115 (closed below)
        try:
            _lock(handle, self.folder)
            yield self
        finally:
            handle.close()  # closing the descriptor releases the flock

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporaries of interrupted atomic writes (only safe under the lock)."""
        removed = self.layout.stale_temporaries()
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def read_config(self) -> dict[str, Any] | None:
        """``config.json`` as a dict, or None when there is none."""
        if not self.layout.config.is_file():
            return None
        try:
            document = json.loads(self.layout.config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{str(self.layout.config)!r} is not valid JSON ({exc}); restore it or start a "
                                 f"new run") from None
        if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
            raise UserInputError(f"{str(self.layout.config)!r} holds no training configuration; restore it or "
                                 f"start a new run")
        return document

    def write_config(self, document: dict[str, Any]) -> None:
        """Write ``config.json`` (only when its text changes)."""
        _write_if_changed(self.layout.config, json.dumps(document, indent=2, default=str).encode("utf-8"))

    def commit_epoch(self, checkpoint: bytes, *, epoch: int, improved: bool, save_every: int,
                     history: list[dict[str, Any]], masks: MaskLog) -> None:
        """Write the files of epoch ``epoch`` in the commit order of the module docstring."""
        masks.write()
        atomic_write_bytes(self.layout.last, checkpoint)
        self._complete(checkpoint, epoch=epoch, is_best=improved, save_every=save_every, history=history,
                       only_if_stale=False)

    def recover(self, checkpoint: bytes | None, raw: dict[str, Any], save_every: int, masks: MaskLog) -> None:
        """Bring the folder to the state an uninterrupted run leaves after the committed epoch.

        Args:
            checkpoint: the bytes of ``last.pt`` when the run resumes from it (None otherwise: nothing
                to complete).
            raw: the stored dict of the checkpoint resumed from (epoch, step, history, best_epoch), or
                ``{}`` when the run starts from scratch (then any ``masks.csv`` is an uncommitted leftover).
            save_every: the run's ``save_every`` (which ``epoch_KKKK.pt`` files belong to it).
            masks: the run's mask log; rows of uncommitted steps are dropped from it and the file.
        """
        self.remove_stale_temporaries()
        if "step" not in raw:
            self.layout.masks.unlink(missing_ok=True)
        elif masks.load(up_to_step=int(raw["step"])):
            masks.write()
        if checkpoint is None:
            return
        epoch = int(raw.get("epoch", 0))
        self._complete(checkpoint, epoch=epoch, is_best=raw.get("best_epoch") == epoch, save_every=save_every,
                       history=list(raw.get("history") or []), only_if_stale=True)

    def _complete(self, checkpoint: bytes, *, epoch: int, is_best: bool, save_every: int,
                  history: list[dict[str, Any]], only_if_stale: bool) -> None:
        """Steps 3-5 of the commit order (skipping files that already hold the right bytes when recovering)."""
        write = _write_if_changed if only_if_stale else atomic_write_bytes
        if is_best:
            write(self.layout.best, checkpoint)
        if save_every and epoch % save_every == 0:
            write(self.layout.epoch(epoch), checkpoint)
        write(self.layout.metrics, metrics_text(history).encode("utf-8"))


def _lock(handle: IO[str], folder: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserInputError(f"run folder {str(folder)!r} is being written by another process (it holds "
                             f"{RunLayout.LOCK}); wait for it to finish or choose another --out") from None


def _write_if_changed(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically unless ``path`` already holds exactly these bytes."""
    try:
        if path.stat().st_size == len(payload) and path.read_bytes() == payload:
            return
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass
    atomic_write_bytes(path, payload)

