"""The ``sharpscope`` console script: ``demo | train | analyze | figures``.

Each sub-command lives in the package it belongs to and registers itself here through a
``(name, module)`` entry; the module provides ``add_arguments(parser)`` and ``run(args) -> int``.
User mistakes (:class:`sharpscope.errors.UserInputError`) are printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import UserInputError

# name -> (module implementing add_arguments/run, one-line help). Modules are imported lazily so
# that `sharpscope --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sharpscope.train.command", "Train a model (ZSharp, SAM, ASAM, Friendly-SAM, SGD, Adam) and save checkpoints."),
    "analyze": ("sharpscope.commands.analyze", "Analyse checkpoints: Hessian spectrum, landscapes, Z-scores, masks, "
                                               "alignment, sharpness."),
    "figures": ("sharpscope.commands.figures", "Draw every comparison figure a folder of result files allows."),
    "demo": ("sharpscope.commands.demo", "Train SGD, SAM and ZSharp on digits, analyse them and draw every figure."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharpscope",
        description="Sharpness-aware training (ZSharp, SAM, ASAM, Friendly-SAM) and sharpness analysis.",
    )
    parser.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserInputError as exc:
        print(f"sharpscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sharpscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
