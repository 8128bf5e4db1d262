"""``python -m sharpscope`` runs the command line, and an error leaves no progress-bar residue.

These run real subprocesses (stderr is a pipe, as under a CI log), so tqdm writes exactly what a
terminal would receive; :func:`_screen` replays it ('\\r' returns to column 0, '\\n' starts a line,
ESC[A moves up) to get what a user would see.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sharpscope
from sharpscope.models import build_model
from sharpscope.train.checkpoint import save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sharpscope(*argv: str, progress: str | None = None) -> subprocess.CompletedProcess:
    """Run it; stdout/stderr decoded without newline translation (text=True would turn '\r' into '\n').

    stderr is a pipe, so progress bars are left out unless ``progress="always"`` (SHARPSCOPE_PROGRESS)."""
    env = ENV if progress is None else {**ENV, "SHARPSCOPE_PROGRESS": progress}
    done = subprocess.run([sys.executable, "-m", "sharpscope", *argv], capture_output=True, env=env, timeout=300)
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return done


def _screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows after receiving ``text``."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[A|\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\r\n\x1b]+", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        elif not token.startswith("\x1b"):
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col + len(token) - len(line)))
            line[col:col + len(token)] = token
            col += len(token)
    return [s for s in ("".join(r).rstrip() for r in rows) if s]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build_model("mlp", 10, seed=0, in_features=64, hidden=(8,))
    folder = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(folder / "mlp.pt", {"model_spec": model.sharpscope_spec, "state_dict": model.state_dict()})


def test_version_through_python_dash_m():
    """``python -m sharpscope --version`` prints the package's version (sharpscope/__main__.py)."""
    done = _sharpscope("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"sharpscope {sharpscope.__version__}"


def test_a_subcommand_through_python_dash_m(checkpoint, tmp_path):
    """``python -m sharpscope analyze`` runs the analysis and writes its result file."""
    done = _sharpscope("analyze", str(checkpoint), "--zscores", "--samples", "16", "--batch-size", "8",
                       "--quiet", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "mlp__zscores.nc").is_file()


def test_an_error_after_progress_bars_started_shows_one_clean_line(checkpoint, tmp_path):
    """Progress bars are on (no --quiet) when the model/data mismatch is found inside the checkpoint
    loop: the screen shows exactly the error line (the bar was cleared), and no traceback."""
    done = _sharpscope("analyze", str(checkpoint), "--zscores", "--data", "synthetic", "--samples", "16",
                       "--out", str(tmp_path / "out"), progress="always")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "checkpoints" in done.stderr  # a bar was drawn, then cleared
    screen = _screen(done.stderr)
    assert len(screen) == 1 and screen[0].startswith("sharpscope analyze: error: checkpoint "), screen
    assert "MLP built for 64 input values per example, got 3072" in screen[0]
