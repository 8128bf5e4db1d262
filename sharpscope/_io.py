"""Atomic file output: write to a temporary file in the target folder, then ``os.replace``.

A reader never sees a half-written file, and a process killed mid-write leaves the previous
version of the file intact (and at worst a temporary ``.NAME.*.tmp`` next to it, which
:meth:`sharpscope.train.layout.RunLayout.stale_temporaries` finds).

An ``OSError`` raised while writing (a full disk, a read-only file system, a folder that is not
writable) names the target file, not the temporary one, so the CLI can say in one line which
file could not be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Test seam for the crash-consistency tests: when set, called as ``replace_hook("before", target)``
#: right before and ``replace_hook("after", target)`` right after every atomic replace (the tests
#: make the process kill itself there). None in normal use.
replace_hook: Callable[[str, Path], None] | None = None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. ``suffix``
    defaults to the suffix of ``path`` (some writers choose the format from it). An ``OSError``
    is re-raised with ``path`` as its file name.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.exists() and target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory")
    with _naming(target):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=(target.suffix if suffix is None else suffix) + ".tmp", dir=folder
        )
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _naming(target):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            # mkstemp creates 0600 files; give the result the permissions a plain open() would.
            os.chmod(tmp, 0o666 & ~_current_umask())
            _replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _replace(tmp: Path, target: Path) -> None:
    if replace_hook is not None:
        replace_hook("before", target)
    os.replace(tmp, target)
    _fsync_folder(target.parent)
    if replace_hook is not None:
        replace_hook("after", target)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable before the next one (the commit order of a run folder relies on it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file, or a temporary of ``target``, naming ``target``.

    An error naming another path (e.g. the folder that could not be created) is left as it is.
    """
    try:
        yield
    except OSError as exc:
        name = None if exc.filename is None else os.path.basename(os.fsdecode(exc.filename))
        temporary = name is not None and name.startswith(f".{target.name}.") and name.endswith(".tmp")
        if exc.errno is None or not (name is None or temporary):
            raise
        # OSError(errno, ...) builds the matching subclass (PermissionError, ...).
        raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_file(path: Path, payload: bytes) -> None:
    """The one place bytes reach a file (the tests make it fail with ENOSPC)."""
    with open(path, "wb") as handle:
        handle.write(payload)


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        _write_file(tmp, payload)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json_lines(path: str | os.PathLike[str], file_name: str, what: str) -> tuple[Path, list[tuple[int, Any]]]:
    """The parsed non-blank lines of a JSON-lines file, each with its line number.

    ``path`` is the file or a folder holding ``file_name``. A missing file or a line that is not JSON
    is one :class:`~sharpscope.errors.UserInputError` naming the file (and the line).
    """
    from .errors import UserInputError

    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise UserInputError(f"{what} file not found: {path} (expected a {file_name} or a run folder)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
    return path, rows
