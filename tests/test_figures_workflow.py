"""The README's trajectory workflow and the folder checks of ``sharpscope figures``.

``train --save-every`` for SAM and ZSharp, ``analyze`` the final AND the epoch checkpoints into one
results folder, ``figures`` on it: the comparisons must hold exactly the two runs (an epoch checkpoint
is a point of a run's trajectory, never a run of its own), and the trajectory figures must be drawn.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sharpscope.cli import main
from sharpscope.commands.figures import _load_results, checkpoint_sources, is_epoch_checkpoint, split_runs
from sharpscope.commands.summary import result_files, seed_table, summary_table

FAST = ["--samples", "200", "--batch-size", "100", "--top-k", "2", "--trace-samples", "12", "--density-iter", "12",
        "--density-runs", "1", "--quiet"]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """runs/{sam,zsharp} trained 2 epochs with --save-every 1, all six checkpoints analysed (--hessian
    --masks) into one results folder, exactly as the README says."""
    root = tmp_path_factory.mktemp("readme")
    checkpoints = []
    for optimizer in ("sam", "zsharp"):
        out = root / "runs" / optimizer
        assert main(["train", "--dataset", "digits", "--model", "mlp", "--optimizer", optimizer, "--epochs", "2",
                     "--save-every", "1", "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
        checkpoints += [out / "last.pt", *sorted(out.glob("epoch_*.pt"))]
    results = root / "results"
    assert main(["analyze", *map(str, checkpoints), "--hessian", "--masks", *FAST, "--out", str(results)]) == 0
    return root, results


def test_epoch_checkpoints_are_trajectories_not_runs(workflow):
    """Every comparison kind holds the two runs only; the epoch checkpoints are recognised by their
    stored checkpoint path (here named after the full path, as analyze does when names collide)."""
    _, results = workflow
    found = _load_results(result_files(results))
    sources = checkpoint_sources(found)
    epochs = {run for run in sources if is_epoch_checkpoint(run, sources)}
    assert len(epochs) == 4 and all("epoch_000" in run for run in epochs)
    runs = split_runs(found)
    for kind in ("hessian_eigenvalues", "hessian_density", "layer_curvature", "mask_statistics", "training_history"):
        assert set(runs[kind]) == {"sam", "zsharp"}, kind
    table = summary_table(results)
    assert table["run"].tolist() == ["sam", "zsharp"]
    assert len(summary_table(results, epochs=True)) == 6
    assert seed_table(table)["seeds"].tolist() == [1, 1]


def test_figures_draw_runs_and_their_trajectories(workflow):
    """figures: the comparison figures are drawn once for the two runs (no per-epoch figure), the
    spectrum overlays two densities (not six), and the curvature trajectory and the mask stability
    come from the epoch checkpoints."""
    from PIL import Image

    root, results = workflow
    figs = root / "figs"
    assert main(["figures", str(results), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    stems = {p.stem for p in figs.glob("*.png")}
    assert {"spectrum", "sharpness_summary", "layer_curvature", "training_curves", "curvature_trajectory",
            "cost", "mask_heatmap_zsharp", "mask_stability"} == stems - {"mask_summary"}
    with Image.open(figs / "curvature_trajectory.png") as image:
        assert image.size[0] == 1650  # 5.5 in at 300 dpi: the NeurIPS text width
    from sharpscope.commands.figures import _curvature_jobs, _ordered

    found = split_runs(_load_results(result_files(results)))
    (_, draw), = [job for job in _curvature_jobs({k: _ordered(v) for k, v in found.items()}, summary_table(results))
                  if job[0] == "spectrum"]
    assert [line.get_label() for line in draw().axes[0].lines if not line.get_label().startswith("_")][:2] == \
        ["SAM", "ZSharp"]


def test_figures_on_a_run_folder_is_one_clear_error(workflow, capsys):
    """`figures runs/` (run folders, no result files): exit 2 and one line that says what to do."""
    root, _ = workflow
    assert main(["figures", str(root / "runs"), "--out", str(root / "nofigs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sharpscope result files" in err[0] and "sharpscope analyze" in err[0]
    assert not Path(root / "nofigs").exists()
