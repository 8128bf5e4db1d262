"""Every bad input to the command line is ONE line on stderr with a non-zero exit and no traceback.

Each case below escaped as a traceback before (issue 11, section 4). The checkpoints are tiny models
written here with ``save_checkpoint``; the expectations are independent facts about them (the MLP
has 610 parameters, the CNN takes 1 channel, five 2x2 poolings cannot run on 8x8 images, ...).
"""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import pytest
import torch
import xarray as xr

from sharpscope._progress import close_progress_bars, progress
from sharpscope.cli import describe_os_error, main, os_error_status
from sharpscope.models import build_model
from sharpscope.train.checkpoint import save_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "results_v0_1"
QUICK = ["--samples", "16", "--batch-size", "8", "--quiet"]
MLP_PARAMETERS = 64 * 8 + 8 + 8 * 10 + 10  # 610


def _checkpoint(folder: Path, name: str, model_name: str, *, poison: bool = False, **kwargs) -> Path:
    model = build_model(model_name, 10, seed=0, **kwargs)
    state = model.state_dict()
    if poison:
        next(iter(state.values()))[0] = float("nan")
    return save_checkpoint(folder / f"{name}.pt", {"model_spec": model.sharpscope_spec, "state_dict": state})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "mlp": _checkpoint(folder, "mlp", "mlp", in_features=64, hidden=(8,)),
        "nan": _checkpoint(folder, "nan", "mlp", poison=True, in_features=64, hidden=(8,)),
        "cnn": _checkpoint(folder, "cnn", "cnn", width=4),
        # VGG-16's five 2x2 max-poolings, at width 4 to stay tiny: 8x8 digits vanish after three
        "vgg": _checkpoint(folder, "vgg", "vgg16_bn", in_channels=1, layers=(4, "M", 4, "M", 4, "M", 4, "M", 4, "M")),
    }


def _one_error_line(capsys, command: str = "analyze") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sharpscope {command}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("model, argv, needle", [
    ("mlp", ["--hessian", "--top-k", "1000"], f"top_k (--top-k) is 1000 but the model has only {MLP_PARAMETERS}"),
    ("mlp", ["--hessian", "--density-iter", "20000"],
     f"density_iter (--density-iter) is 20000 but the model has only {MLP_PARAMETERS}"),
    ("mlp", ["--sharpness", "--data", "synthetic"], "MLP built for 64 input values per example, got 3072"),
    ("cnn", ["--zscores", "--data", "synthetic"], "inputs of shape (3, 32, 32)"),
    ("vgg", ["--zscores", "--data", "digits"], "the VGG model cannot run on this data (inputs of shape (1, 8, 8)"),
    ("nan", ["--sharpness"], "non-finite values (NaN or inf) in net.0.weight"),
    ("nan", ["--hessian"], "non-finite values (NaN or inf) in net.0.weight"),
])
def test_analyze_refuses_up_front_with_one_line(model, argv, needle, ckpts, tmp_path, capsys):
    """Budgets beyond the parameter count, a model that cannot run on the data (shape, channels, too
    small for its poolings) and non-finite weights: exit 2, one line, and no result file is written
    (the check comes before any long work)."""
    out = tmp_path / "out"
    assert main(["analyze", str(ckpts[model]), *argv, *QUICK, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert needle in line
    assert list(out.glob("*.nc")) == []


def test_class_labels_beyond_the_outputs_are_refused(ckpts, tmp_path):
    """A label 12 for a 10-output model would be an IndexError on the CPU (a device assert on a GPU)."""
    from sharpscope.commands import analyze_checkpoint
    from sharpscope.errors import UserInputError

    batch = (torch.randn(4, 64), torch.tensor([0, 1, 12, 3]))
    with pytest.raises(UserInputError, match="class label 12 but the model has 10 outputs"):
        analyze_checkpoint(ckpts["mlp"], batch, ["zscores"], tmp_path, show_progress=False)


def test_multiple_checkpoints_are_all_checked_before_the_first_is_analysed(ckpts, tmp_path, capsys):
    """The bad second checkpoint is refused before the first one's result files are written."""
    out = tmp_path / "out"
    assert main(["analyze", str(ckpts["mlp"]), str(ckpts["nan"]), "--zscores", *QUICK, "--out", str(out)]) == 2
    assert "nan.pt" in _one_error_line(capsys)
    assert list(out.glob("*.nc")) == []


@pytest.mark.parametrize("sub", ["", "sub/deeper"])
def test_output_folder_under_a_file(sub, ckpts, tmp_path, capsys):
    """--out naming a file, or a folder below a file (how an unwritable --out looks to root, for whom
    chmod does not stop writes): one line naming the file in the way."""
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    out = blocker / sub if sub else blocker
    assert main(["analyze", str(ckpts["mlp"]), "--zscores", *QUICK, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"'{blocker}'" in line and "is a file" in line


def test_output_folder_that_cannot_be_written_is_refused_before_reading_data(ckpts, tmp_path, capsys,
                                                                             monkeypatch):
    """The write probe failing with EACCES (simulated: tests run as root) -> exit 2 naming the folder,
    and the dataset is never loaded."""
    import tempfile

    import sharpscope.data as data_module

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(kwargs["dir"]) / "tmpab12cd"))

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    monkeypatch.setattr(data_module, "load_dataset", lambda *a, **k: pytest.fail("data read before the check"))
    out = tmp_path / "ro"
    assert main(["analyze", str(ckpts["mlp"]), "--zscores", *QUICK, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"'{out}': Permission denied" in line and "tmpab12cd" not in line


@pytest.mark.parametrize("code, status, reason", [
    (errno.ENOSPC, 1, "No space left on device; free some space"),
    (errno.EROFS, 2, "Read-only file system; choose a location you can write to"),
])
def test_write_failures_are_one_line_naming_the_result_file(code, status, reason, ckpts, tmp_path, capsys,
                                                             monkeypatch):
    """A full disk (the environment: exit 1) or a read-only file system (the path given: exit 2) while
    a result is written: one line naming the result file (not the hidden temporary), and no file,
    half-written or temporary, is left in the folder."""
    def failing_write(self, path, *args, **kwargs):
        with open(path, "wb") as handle:  # a partial write, then the failure
            handle.write(b"CDF\x01")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(xr.Dataset, "to_netcdf", failing_write)
    out = tmp_path / "out"
    assert main(["analyze", str(ckpts["mlp"]), "--zscores", *QUICK, "--out", str(out)]) == status
    line = _one_error_line(capsys)
    assert f"'{out / 'mlp__zscores.nc'}': {reason}" in line
    assert sorted(p.name for p in out.iterdir()) == []


def test_os_error_description_and_status():
    """Missing file and permission problems are the user's (2); I/O errors the environment's (1)."""
    missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "data/x.bin")
    assert (describe_os_error(missing), os_error_status(missing)) == ("'data/x.bin': No such file or directory", 2)
    io_error = OSError(errno.EIO, os.strerror(errno.EIO), "/mnt/out/.a.nc.k2j3h4g5.nc.tmp")
    assert (describe_os_error(io_error), os_error_status(io_error)) == ("'/mnt/out/a.nc': Input/output error", 1)
    assert describe_os_error(OSError("no errno")) == "no errno"


def test_an_unexpected_exception_keeps_its_traceback(ckpts, tmp_path, monkeypatch):
    """A bug (here an injected ZeroDivisionError) is not disguised as a user error: it propagates."""
    import sharpscope.commands.analyze as analyze

    def broken(job):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(analyze.ANALYSIS_STEPS, "zscores", broken)
    with pytest.raises(ZeroDivisionError):
        main(["analyze", str(ckpts["mlp"]), "--zscores", *QUICK, "--out", str(tmp_path)])


def test_result_file_with_a_kind_but_missing_variables(tmp_path, capsys):
    """figures on a folder holding a netCDF file tagged 'hessian_trace' whose variables were removed:
    one line naming the file (it was a KeyError traceback)."""
    folder = tmp_path / "results"
    folder.mkdir()
    ds = xr.load_dataset(FIXTURES / "trace.nc", engine="scipy")
    ds.drop_vars(list(ds.data_vars)).to_netcdf(folder / "run__trace.nc", engine="scipy")
    status = main(["figures", str(folder), "--out", str(tmp_path / "figs"), "--quiet"])
    line = _one_error_line(capsys, "figures")
    assert status == 2 and "run__trace.nc" in line


def test_close_progress_bars_clears_the_line(monkeypatch):
    """A bar left half-way by an exception is closed and its line blanked ('\\r' + spaces + '\\r')."""
    monkeypatch.setenv("SHARPSCOPE_PROGRESS", "always")  # the stream is not a terminal
    stream = io.StringIO()
    bar = iter(progress(range(10), desc="work", file=stream, mininterval=0))
    next(bar)
    assert close_progress_bars() >= 1
    text = stream.getvalue()
    assert re.search(r"\r +\r$", text), repr(text[-80:])
    assert close_progress_bars() == 0
