"""The console script: --version and --help work through the installed entry point."""

import subprocess
import sys

import sharpscope
from sharpscope.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert sharpscope.__version__ in capsys.readouterr().out


def test_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "sharpscope.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: sharpscope" in out.stdout
