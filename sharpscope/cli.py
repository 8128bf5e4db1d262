"""The ``sharpscope`` console script: ``demo | train | analyze | figures``.

Each sub-command lives in the package it belongs to and registers itself here through a
``(name, module)`` entry; the module provides ``add_arguments(parser)`` and ``run(args) -> int``.

Exit statuses. Whatever goes wrong is said in ONE line on stderr, ``sharpscope <command>: error: ...``,
after any progress bar has been cleared:

* ``2``: a mistake in what was given (:class:`sharpscope.errors.UserInputError`: a bad argument, a
  checkpoint that does not fit the data, ...) or a path that cannot be used as given (an
  ``OSError`` such as a missing file, a folder that is not writable, a read-only file system);
* ``1``: the environment failed under a correct command (any other ``OSError``: a full disk, an
  I/O error); the line names the path;
* ``130``: interrupted (Ctrl-C).

Any other exception is a bug in sharpscope, not a user error: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .errors import UserInputError

# torch, tqdm and the sub-command modules are imported only once a command runs, so that
# `sharpscope --help` and `--version` answer at once.

# name -> (module implementing add_arguments/run, one-line help). Modules are imported lazily so
# that `sharpscope --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sharpscope.train.command", "Train a model (ZSharp, SAM, ASAM, Friendly-SAM, SGD, Adam) and save checkpoints."),
    "analyze": ("sharpscope.commands.analyze", "Analyse checkpoints: Hessian spectrum, landscapes, Z-scores, masks, "
                                               "alignment, sharpness."),
    "figures": ("sharpscope.commands.figures", "Draw every comparison figure a folder of result files allows."),
    "demo": ("sharpscope.commands.demo", "Train SGD, SAM and ZSharp on digits, analyse them and draw every figure."),
    "sweep": ("sharpscope.commands.sweep", "Train a grid of runs (optimizers x rho x percentile x seeds), resumable; "
                                           "analyse them and draw the sweep, seed and correlation figures."),
}

#: OS errors caused by the path given (exit 2); any other ``errno`` is the environment's (exit 1).
USER_ERRNOS: frozenset[int] = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO,
})
_HINTS = {
    errno.ENOSPC: "free some space (or write elsewhere) and run again",
    errno.EDQUOT: "free some space (or write elsewhere) and run again",
    errno.EROFS: "choose a location you can write to",
    errno.EACCES: "choose a location you can write to, or fix its permissions",
    errno.EPERM: "choose a location you can write to, or fix its permissions",
}
# the temporary file of sharpscope._io.atomic_output: ".<target>.<8 random chars><suffix>.tmp"
_ATOMIC_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}(\.[^.]*)?\.tmp$")


def close_progress_bars() -> None:
    from ._progress import close_progress_bars as close

    close()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the sub-command named in ``argv`` (all of them when None) imports its module."""
    chosen = None if argv is None else _chosen_command(argv)
    parser = argparse.ArgumentParser(
        prog="sharpscope",
        description="Sharpness-aware training (ZSharp, SAM, ASAM, Friendly-SAM) and sharpness analysis.",
    )
    parser.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if chosen is not None and name != chosen:
            continue  # listed in the help; its options are only needed when it is the command
        module = importlib.import_module(module_name)
        module.add_arguments(cmd)
        cmd.add_argument("--threads", type=int, default=None, metavar="N",
                         help="intra-op threads for the work (default: the thread policy measures whether 1 "
                              "or torch's default is faster for this model, once per analysis)")
        cmd.set_defaults(_run=module.run)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names (the first word that is one), "" when none, None to build all."""
    for word in argv:
        if word in SUBCOMMANDS:
            return word
        if not word.startswith("-"):
            return None  # an unknown command: let argparse list the choices
    return ""


def os_error_status(exc: OSError) -> int:
    """2 when the path given is at fault (:data:`USER_ERRNOS`), else 1 (the environment)."""
    return 2 if exc.errno in USER_ERRNOS else 1


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and what the system said, e.g. ``'out/x.nc': No space left on device``.

    A temporary file of an atomic write is named by the file it was going to become.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno)
    reason = f"{reason}; {hint}" if hint else reason
    paths = [_shown_path(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return reason
    return f"{' -> '.join(repr(p) for p in paths)}: {reason}"


def _shown_path(filename: object) -> str:
    path = Path(filename.decode(errors="replace") if isinstance(filename, bytes) else str(filename))
    match = _ATOMIC_TEMPORARY.match(path.name)
    return str(path.with_name(match.group("target")) if match else path)


def one_line(text: str) -> str:
    """``text`` with its line breaks (and runs of blanks) folded into single spaces."""
    return " ".join(str(text).split())


def _fail(command: str, message: str, status: int) -> int:
    close_progress_bars()  # a half-drawn bar must not share the line of the message
    print(f"sharpscope {command}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    from .threads import fixed_threads

    try:
        with fixed_threads(getattr(args, "threads", None)):
            return int(args._run(args) or 0)
    except UserInputError as exc:
        return _fail(args.command, str(exc), 2)
    except OSError as exc:
        return _fail(args.command, describe_os_error(exc), os_error_status(exc))
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"sharpscope {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException:  # a bug: keep the traceback, but on a clean line
        close_progress_bars()
        raise


if __name__ == "__main__":
    sys.exit(main())
