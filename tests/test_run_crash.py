"""Crash consistency of a run folder, tested the hard way.

A training process is SIGKILLed (by itself, through the ``sharpscope._io.replace_hook`` test seam)
right before or right after the N-th atomic file replace of a short run, for every N; the run is
then resumed, and the folder is compared file by file with the folder of an uninterrupted run of
the same settings: the same file names (no temporaries), checkpoint tensors equal bit for bit
(other checkpoint fields equal apart from ``saved_at`` and wall-clock fields), ``metrics.jsonl``
rows equal apart from ``time_s``/``images_per_s``, and ``config.json``/``masks.csv`` equal byte for
byte. The reference is the uninterrupted run, computed independently of the recovery code.

The killed process is a fork of the test process (a fresh interpreter would spend seconds importing);
one test runs it as a fresh interpreter instead (``python tests/test_run_crash.py OUT PHASE N RESUME``),
which also checks that nothing of the test process leaks into the files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sharpscope import _io
from sharpscope.data.synthetic import load_synthetic
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.train import fit

# lr 3 and seed 1: test accuracy 0.562, 0.406, 0.656 (measured), so epoch 2 keeps the best.pt of epoch 1
# and epoch 3 replaces it: both the "best.pt unchanged" and the "best.pt stale" cases occur.
SETTINGS = {"optimizer": "zsharp", "lr": 3.0, "epochs": 3, "batch_size": 16, "log_mask_every": 3,
            "save_every": 1, "progress": False, "seed": 1, "device": "cpu", "augment": False}
WALL_CLOCK = ("time_s", "images_per_s")
KILLED = -signal.SIGKILL


def train_short_run(out: Path, resume: bool) -> Any:
    """The short run: ZSharp on 64 synthetic 1x4x4 images of 4 classes, an MLP with 8 hidden units."""
    train = load_synthetic(True, num_examples=64, num_classes=4, image_size=4, channels=1)
    test = load_synthetic(False, num_examples=32, num_classes=4, image_size=4, channels=1)
    torch.manual_seed(0)
    model = build_model("mlp", 4, in_features=16, hidden=(8,))
    return fit(model, train, test, out=out, resume=resume, **SETTINGS)


def _kill_at(phase: str, n: int) -> None:
    """Make this process SIGKILL itself at the n-th replace of ``phase`` ("before" or "after")."""
    count = 0

    def hook(when: str, target: Path) -> None:
        nonlocal count
        if when == phase:
            count += 1
            if count == n:
                os.kill(os.getpid(), signal.SIGKILL)

    _io.replace_hook = hook


def _subprocess(out: Path, phase: str, n: int, resume: bool) -> int:
    """Run the short run in a fresh interpreter killed at (phase, n); return its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(out), phase, str(n), str(int(resume))], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode in (KILLED, 0), proc.stderr.decode()[-2000:]
    return proc.returncode


def _forked(work: Callable[[], object], phase: str, n: int) -> int:
    """Run ``work`` in a forked child that kills itself at (phase, n); return its exit status
    (``KILLED``, or 0 when it finished first)."""
    with one_thread():
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                _kill_at(phase, n)
                work()
                code = 0
            except BaseException:  # noqa: BLE001 -- reported by the parent through the exit status
                traceback.print_exc()
            finally:
                os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            assert code in (KILLED, 0), f"the child failed with status {code} (traceback above)"
            return code
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish within 120 s")


def recover(out: Path) -> None:
    """What a user does after a crash: resume; a folder holding nothing of the run is started afresh."""
    if (out / "last.pt").exists() or (out / "config.json").exists():
        train_short_run(out, resume=True)
        return
    with pytest.raises(UserInputError, match="nothing to resume"):
        train_short_run(out, resume=True)
    train_short_run(out, resume=False)


def run_reference(out: Path) -> list[str]:
    """Run the short run uninterrupted into ``out``; return the names of its atomic writes, in order."""
    events: list[tuple[str, str]] = []
    _io.replace_hook = lambda when, target: events.append((when, target.name))
    try:
        with one_thread():
            train_short_run(out, resume=False)
    finally:
        _io.replace_hook = None
    return [name for when, name in events if when == "after"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The uninterrupted run and the list of its write boundaries, in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, run_reference(out)


class one_thread:
    """torch on one thread here, as in the child processes (the same arithmetic, bit for bit)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


def _same_value(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            if key not in ("saved_at", *WALL_CLOCK):
                _same_value(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_value(x, y, f"{where}/{i}")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN equals NaN here


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def assert_same_run(expected: Path, got: Path) -> None:
    """Every file of ``expected`` is in ``got`` with equal content (see the module docstring), and no other."""
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        a, b = expected / name, got / name
        if name.endswith(".pt"):
            _same_value(torch.load(a, weights_only=True), torch.load(b, weights_only=True), name)
        elif name == "metrics.jsonl":
            assert _metrics_rows(a) == _metrics_rows(b)
        else:
            assert a.read_bytes() == b.read_bytes(), name


def _trial(reference: tuple[Path, list[str]], tmp_path: Path, phase: str, n: int) -> None:
    expected, _ = reference
    out = tmp_path / f"{phase}-{n}"
    assert _forked(lambda: train_short_run(out, resume=False), phase, n) == KILLED
    with one_thread():
        recover(out)
    assert_same_run(expected, out)


def test_reference_run_has_the_boundaries_this_file_expects(reference):
    """The commit order of sharpscope/train/run_folder.py: config.json, then per epoch masks.csv, last.pt,
    best.pt (when the epoch improved), epoch_K.pt, metrics.jsonl; the short run improves in epochs 1 and 3."""
    _, writes = reference
    epoch = ["masks.csv", "last.pt", "best.pt", "epoch_0001.pt", "metrics.jsonl"]
    assert writes == ["config.json", *epoch, "masks.csv", "last.pt", "epoch_0002.pt", "metrics.jsonl",
                      *[name.replace("0001", "0003") for name in epoch]]


def _nth(writes: list[str], name: str, k: int) -> int:
    """1-based index of the k-th write of ``name`` (k = -1: the last one)."""
    positions = [i + 1 for i, w in enumerate(writes) if w == name]
    return positions[k]


@pytest.mark.parametrize("case", ["after second last.pt", "after final last.pt", "before epoch_0002.pt"])
def test_kill_at_representative_boundaries_then_resume(reference, tmp_path, case):
    """The three failures seen before: a kill between last.pt and best.pt/epoch_K.pt, after the final
    last.pt (resume must complete, not refuse), and mid-write (a temporary left behind)."""
    _, writes = reference
    phase, n = {"after second last.pt": ("after", _nth(writes, "last.pt", 1)),
                "after final last.pt": ("after", _nth(writes, "last.pt", -1)),
                "before epoch_0002.pt": ("before", _nth(writes, "epoch_0002.pt", 0))}[case]
    _trial(reference, tmp_path, phase, n)


@pytest.mark.slow
def test_kill_at_every_write_boundary_then_resume(reference, tmp_path):
    """Every boundary: right before (temporary complete, not renamed) and right after each atomic replace."""
    _, writes = reference
    for n in range(1, len(writes) + 1):
        for phase in ("before", "after"):
            _trial(reference, tmp_path, phase, n)


def test_kill_in_a_fresh_interpreter_then_resume(reference, tmp_path):
    """The same check with the killed run in a new Python process (nothing shared with this one)."""
    expected, writes = reference
    out = tmp_path / "fresh"
    assert _subprocess(out, "after", _nth(writes, "best.pt", 1), resume=False) == KILLED
    with one_thread():
        recover(out)
    assert_same_run(expected, out)


def test_kill_during_recovery_then_resume_again(reference, tmp_path):
    """A second kill inside the resumed process (right before its first write: a completion or the
    re-done epoch), then a third process resumes: still the uninterrupted run's files."""
    expected, writes = reference
    for n in (_nth(writes, "last.pt", 1), _nth(writes, "last.pt", -1), _nth(writes, "masks.csv", 1)):
        out = tmp_path / f"twice-{n}"
        assert _forked(lambda: train_short_run(out, resume=False), "after", n) == KILLED  # noqa: B023
        _forked(lambda: train_short_run(out, resume=True), "before", 1)  # noqa: B023 -- 0: nothing left to write
        with one_thread():
            recover(out)
        assert_same_run(expected, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _kill_at(sys.argv[2], int(sys.argv[3]))
    train_short_run(Path(sys.argv[1]), resume=bool(int(sys.argv[4])))
