"""A run folder under failures other than a kill: a full disk at any write, a second writer (the
lock), resuming with other data/settings or a corrupted masks.csv, and resuming a complete run.
The reference for file contents is an uninterrupted run of the same settings (tests/test_run_crash.py)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from test_run_crash import SETTINGS, assert_same_run, one_thread, recover, run_reference, train_short_run

from sharpscope import _io
from sharpscope.cli import main
from sharpscope.data.synthetic import load_synthetic
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.train import fit, load_checkpoint, read_metrics
from sharpscope.train.layout import RunLayout
from sharpscope.train.run_folder import RunFolder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, run_reference(out)


def _fail_write(monkeypatch, n: int, code: int = errno.ENOSPC) -> None:
    """Make the n-th file write raise ``OSError(code)`` (as a full disk does), once."""
    calls = 0
    real = _io._write_file

    def failing(path, payload):
        nonlocal calls
        calls += 1
        if calls == n:
            raise OSError(code, os.strerror(code), str(path))
        real(path, payload)

    monkeypatch.setattr(_io, "_write_file", failing)


def _consistent(out: Path) -> None:
    """metrics.jsonl lists no epoch whose checkpoints are missing; no temporaries are left."""
    layout = RunLayout(out)
    assert layout.stale_temporaries() == []
    if not layout.metrics.exists():
        return
    listed = read_metrics(out)["epoch"].tolist()
    committed = load_checkpoint(layout.last, model=_model()).epoch if listed else 0
    assert all(e <= committed and layout.epoch(e).exists() for e in listed), (listed, committed)


def _model():
    return build_model("mlp", 4, in_features=16, hidden=(8,))


def _full_disk_trial(expected: Path, writes: list[str], out: Path, n: int, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        _fail_write(patch, n)
        with pytest.raises(OSError) as info, one_thread():
            train_short_run(out, resume=False)
    assert info.value.errno == errno.ENOSPC and Path(info.value.filename).name == writes[n - 1]
    _consistent(out)
    with one_thread():
        recover(out)
    assert_same_run(expected, out)


@pytest.mark.parametrize("which", [("masks.csv", 1), ("last.pt", 1), ("epoch_0002.pt", 0), ("metrics.jsonl", -1)])
def test_full_disk_names_the_file_and_resumes_to_the_uninterrupted_run(reference, tmp_path, monkeypatch, which):
    """ENOSPC at one write (the second epoch's mask log, checkpoint, epoch file; the last metrics.jsonl):
    an OSError naming the run file (not a temporary, not a torch error), a folder whose metrics.jsonl
    lists only epochs with checkpoints, and after space is freed, resume gives the uninterrupted run."""
    expected, writes = reference
    name, k = which
    n = [i + 1 for i, w in enumerate(writes) if w == name][k]
    _full_disk_trial(expected, writes, tmp_path / "run", n, monkeypatch)


@pytest.mark.slow
def test_full_disk_at_every_write(reference, tmp_path, monkeypatch):
    """The same at every write of the short run in turn."""
    expected, writes = reference
    for n in range(1, len(writes) + 1):
        _full_disk_trial(expected, writes, tmp_path / f"full-{n}", n, monkeypatch)


@pytest.mark.parametrize("code, status, words", [(errno.ENOSPC, 1, "No space left on device; free some space"),
                                                 (errno.EROFS, 2, "Read-only file system; choose a location"),
                                                 (errno.EACCES, 2, "Permission denied; choose a location")])
def test_cli_write_failure_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, code, status, words):
    """A write that fails with ENOSPC / EROFS / EACCES (simulated at the third write: last.pt of
    the first epoch, after config.json and masks.csv) is one line naming the run file, with the CLI's exit status for it."""
    _fail_write(monkeypatch, 3, code)  # config.json, masks.csv, then last.pt
    out = tmp_path / "run"
    rc = main(["train", "--optimizer", "zsharp", "--epochs", "1", "--batch-size", "256", "--log-mask-every", "2",
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == status and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{str(out / 'last.pt')!r}: {words}" in err
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ lock


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    """Two lock attempts on one folder: the second fails at once with one line; after the first is
    released the folder can be locked again. fit and the CLI refuse likewise and write nothing."""
    out = tmp_path / "run"
    with RunFolder(out).locked():
        with pytest.raises(UserInputError, match="is being written by another process") as info:
            with RunFolder(out).locked():
                pass
        assert "\n" not in str(info.value)
        with pytest.raises(UserInputError, match="is being written by another process"):
            train_short_run(out, resume=False)
        assert main(["train", "--epochs", "1", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is being written by another process" in err
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    with RunFolder(out).locked():
        pass


def test_lock_is_held_by_another_process(tmp_path):
    """The lock works across processes: a forked child holding it makes this process's attempt fail."""
    out = tmp_path / "run"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with RunFolder(out).locked():
                os.write(write_end, b"x")
                time.sleep(60)  # killed by the parent long before
        finally:
            os._exit(0)
    try:
        assert os.read(read_end, 1) == b"x"
        with pytest.raises(UserInputError, match="is being written by another process"):
            with RunFolder(out).locked():
                pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    with RunFolder(out).locked():
        pass


# --------------------------------------------------------------------------------------- resume


def test_resume_of_a_complete_run_completes_and_succeeds(reference, tmp_path, capsys):
    """A complete run with best.pt, the last epoch file and metrics.jsonl deleted: `resume` (Python and
    CLI-like) restores them from last.pt and returns the stored history instead of refusing."""
    expected, _ = reference
    out = tmp_path / "run"
    with one_thread():
        train_short_run(out, resume=False)
        for name in ("best.pt", "epoch_0003.pt", "metrics.jsonl"):
            (out / name).unlink()
        result = train_short_run(out, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert_same_run(expected, out)


def test_cli_resume_of_a_complete_run_exits_0(tmp_path, capsys):
    """`sharpscope train --resume` on a run that has its epochs: exit 0, "done", and the note on stderr."""
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "done: sgd on digits, 1 epochs" in captured.out and "nothing trained" in captured.err
    assert read_metrics(out)["epoch"].tolist() == [1]


def test_resume_from_a_0_1_run_folder(tmp_path):
    """The run folder written by sharpscope 0.1.0 (no digest, no best_epoch) resumes to a second epoch."""
    out = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_v0_1", out)
    assert main(["train", "--resume", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 2 and [r["epoch"] for r in ckpt.history] == [1, 2] and "digest" in ckpt.raw
    assert read_metrics(out)["epoch"].tolist() == [1, 2]


@pytest.fixture()
def one_epoch(tmp_path):
    """A one-epoch run of the short run's settings (resumable to three)."""
    out = tmp_path / "run"
    train = load_synthetic(True, num_examples=64, num_classes=4, image_size=4, channels=1)
    test = load_synthetic(False, num_examples=32, num_classes=4, image_size=4, channels=1)
    torch.manual_seed(0)
    fit(_model(), train, test, out=out, **{**SETTINGS, "epochs": 1})
    return out, train, test


def test_resume_with_other_data_or_settings_is_refused(one_epoch):
    """Other training data, or a setting that changes the weights (lr), is refused with one line;
    a setting that does not (save_every) is accepted."""
    out, train, test = one_epoch
    other = load_synthetic(True, num_examples=48, num_classes=4, image_size=4, channels=1)
    with pytest.raises(UserInputError, match=r"on other data: the run was trained on synthetic/train \(64 "):
        fit(_model(), other, test, out=out, resume=True, **SETTINGS)
    with pytest.raises(UserInputError, match=r"with other settings: lr \(run: 3.0, now: 0.5\)") as info:
        fit(_model(), train, test, out=out, resume=True, **{**SETTINGS, "lr": 0.5})
    assert "\n" not in str(info.value)
    fit(_model(), train, test, out=out, resume=True, **{**SETTINGS, "epochs": 2, "save_every": 2})
    assert (out / "epoch_0002.pt").exists()


@pytest.mark.parametrize("content, reason", [
    (b"\x00\xff\xfe garbage \x00", "is corrupted"),
    (b"step,epoch\n1,2\n", "is corrupted (no 'layer' column)"),
    ("TORN", "is corrupted (a row without an integer 'numel')"),
])
def test_resume_with_a_corrupted_masks_csv_is_refused(one_epoch, content, reason):
    """masks.csv replaced by binary junk, a foreign table, or cut in the middle of its last line:
    resume stops with one line naming the file instead of mixing the junk into the log."""
    out, train, test = one_epoch
    masks = out / "masks.csv"
    if content == "TORN":
        text = masks.read_text()
        content = text[: text.rindex("\n", 0, len(text) - 1) + 12].encode()
    masks.write_bytes(content)
    with pytest.raises(UserInputError, match="masks.csv'? " + reason.replace("(", r"\(").replace(")", r"\)")) \
            as info:
        fit(_model(), train, test, out=out, resume=True, **SETTINGS)
    assert "\n" not in str(info.value)


def test_cli_resume_with_another_dataset_is_one_line(tmp_path, capsys):
    """`--resume --dataset synthetic` on a digits run: exit 2 before any data is read."""
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--dataset", "synthetic", "--epochs", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the run's dataset digits" in err
    assert main(["train", "--resume", "--lr", "0.5", "--epochs", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "with other settings: lr (run: 0.1, now: 0.5)" in err
