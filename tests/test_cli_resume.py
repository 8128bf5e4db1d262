"""``sharpscope analyze --landscape`` continues a grid left half-done by a killed run (issue 11, section 3).

The progress file is ``<out>/<run>__landscape_1d.nc.partial`` (:func:`resume_path`). The test plants a
partial grid whose finished points hold a sentinel value no evaluation can give (123.0): after the
next run those points still hold it (they were continued, not recomputed) while the unfinished ones
equal an uninterrupted run's values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sharpscope.analysis.landscape import Landscape
from sharpscope.cli import main
from sharpscope.commands.analyze import resume_path
from sharpscope.models import build_model
from sharpscope.train.checkpoint import save_checkpoint

ARGS = ["--landscape", "--steps-1d", "7", "--grid-2d", "3", "--samples", "32", "--batch-size", "16", "--quiet"]
SENTINEL = 123.0


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = build_model("mlp", 10, seed=0, in_features=64, hidden=(8,))
    return save_checkpoint(tmp_path / "mlp.pt", {"model_spec": model.sharpscope_spec, "state_dict": model.state_dict()})


def _plant_partial(final: Path, finished: int) -> Path:
    """Turn a complete 1-D grid into the progress file of a run killed after ``finished`` points."""
    full = Landscape.load(final)
    ds = full.dataset.copy(deep=True)
    ds["loss"].values[:finished] = SENTINEL
    ds["loss"].values[finished:] = np.nan
    ds["accuracy"].values[finished:] = np.nan
    ds["done"].values[:] = 0
    ds["done"].values[:finished] = 1
    partial = Landscape(ds, full.settings).save(resume_path(final))
    final.unlink()
    return partial


def test_a_partial_grid_is_continued_not_recomputed(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", str(checkpoint), *ARGS, "--out", str(out)]) == 0
    final = out / "mlp__landscape_1d.nc"
    assert not resume_path(final).exists()  # removed once the result is written
    uninterrupted = Landscape.load(final).loss.copy()
    partial = _plant_partial(final, finished=3)

    assert main(["analyze", str(checkpoint), *ARGS, "--out", str(out)]) == 0
    resumed = Landscape.load(final)
    np.testing.assert_array_equal(resumed.loss[:3], [SENTINEL] * 3)  # kept from the file
    np.testing.assert_allclose(resumed.loss[3:], uninterrupted[3:], rtol=1e-12)  # computed now
    assert resumed.done.all() and not partial.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".nc")) == []


def test_a_partial_grid_from_other_settings_is_refused(checkpoint, tmp_path, capsys):
    """Another --seed draws another sample and other directions: the file is refused in one line naming
    it, not mixed into the new grid."""
    out = tmp_path / "out"
    assert main(["analyze", str(checkpoint), *ARGS, "--out", str(out)]) == 0
    partial = _plant_partial(out / "mlp__landscape_1d.nc", finished=3)
    capsys.readouterr()
    assert main(["analyze", str(checkpoint), *ARGS, "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume from" in err[0] and str(partial) in err[0]
    assert partial.exists()
