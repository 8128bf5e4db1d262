"""``sharpscope sweep``: the grid it trains, what it hands to analyze/figures, and that it resumes.

Kept tiny: synthetic images, one epoch, the sharpness analysis on 64 examples.
"""

from __future__ import annotations

import pytest

from sharpscope.cli import main
from sharpscope.commands.sweep import GridPoint, grid
from sharpscope.errors import UserInputError


def test_grid_gives_each_optimizer_only_its_hyperparameters():
    """SGD: one run per seed; SAM: rho x seed; ZSharp: rho x percentile x seed (counted by hand)."""
    points = grid(["sgd", "sam", "zsharp"], [0.02, 0.1], [0.9, 0.95], [0, 1])
    assert len(points) == 2 + 2 * 2 + 2 * 2 * 2
    assert GridPoint("sgd", 0) in points and GridPoint("zsharp", 1, 0.1, 0.9) in points
    assert GridPoint("zsharp", 1, 0.1, 0.9).name == "zsharp_rho0.1_p0.9_s1"
    assert all(p.rho is None for p in points if p.optimizer == "sgd")


def test_sweep_trains_analyses_draws_and_resumes(tmp_path, capsys):
    """Three runs (SGD, ZSharp at two percentiles) on synthetic data for one epoch: one run folder
    each, the results name the runs with their percentile, the percentile sweep figure is drawn; a
    second call trains and analyses nothing (the files keep their modification times)."""
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--dataset", "synthetic", "--optimizers", "sgd,zsharp", "--percentile",
            "0.9,0.95", "--epochs", "1", "--batch-size", "500", "--analyses", "sharpness", "--samples", "64",
            "--quiet"]
    assert main(args) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["sgd_s0", "zsharp_rho0.05_p0.95_s0", "zsharp_rho0.05_p0.9_s0"]
    assert (out / "figures" / "sweep_percentile.png").is_file()
    table = capsys.readouterr().out
    assert "zsharp_rho0.05_p0.9_s0" in table and "| 0.9 |" in table
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "runs").glob("*/last.pt"), *(out / "results").glob("*.nc")]}
    assert main([*args, "--no-figures"]) == 0  # the figures do not change what is trained or analysed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_sweep_refuses_unknown_optimizer(tmp_path):
    """A typo is refused before any training, in one line."""
    from sharpscope.commands.sweep import run_sweep

    with pytest.raises(UserInputError, match="optimizer"):
        run_sweep(tmp_path, optimizers=["sgdd"], epochs=1)
