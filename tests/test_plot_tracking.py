"""Figures of sharpness tracked during training: plot_sharpness_over_training, the tracked-masks heatmap,
and `sharpscope figures` on runs that tracked.

The rows come from real tiny tracked runs (a digits MLP, 2 epochs, tracking every 3 steps); what a figure
draws is checked against the run's tracking.jsonl parsed here with json (not through sharpscope's reader),
and the thresholds against the formulas (2 + 2 beta)/lr (SGD) and (2 + 2 beta1)/((1 - beta1) lr) (Adam)
evaluated from the training settings.
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import QuadMesh

from sharpscope.cli import main
from sharpscope.data import load_dataset
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.plot import OPTIMIZER_COLORS, plot_mask_heatmap, plot_sharpness_over_training, tracked_masks
from sharpscope.train import fit

SGD_LR, ADAM_LR, MOMENTUM = 0.3, 0.01, 0.9  # SGD: (2 + 2 beta)/lr = 12.7 lies within the drawn range


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An SGD run tracking lambda_max and a ZSharp(Adam) run tracking lambda_max, preconditioned, masks."""
    root = tmp_path_factory.mktemp("tracked")
    train = load_dataset("digits").subset(range(192))
    settings = {"sgd": ("sgd", SGD_LR, "lambda_max"), "zsharp": ("adam", ADAM_LR, "lambda_max,preconditioned,masks")}
    for name, (base, lr, track) in settings.items():
        torch.manual_seed(0)
        model = build_model("mlp", 10, in_features=64, hidden=(16,))
        fit(model, train, optimizer=name, base=base, lr=lr, momentum=MOMENTUM, epochs=2, batch_size=32,
            track=track, track_every=3, track_samples=64, progress=False, out=root / name)
    return root


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _jsonl(folder, measure):
    """The run's rows of one measure, parsed with json."""
    lines = (folder / "tracking.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["measure"] == measure]


def _line(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return line


def _dashed(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]


def test_lambda_max_line_and_threshold_are_the_tracked_rows(runs):
    """The SGD line is the (step, value) of tracking.jsonl; the dashed line is (2 + 2 beta)/lr = 12.7 at
    every tracked step (constant learning rate); error bars are the rows' error bounds."""
    rows = _jsonl(runs / "sgd", "lambda_max")
    ax = plot_sharpness_over_training(runs / "sgd")
    line = _line(ax, "SGD")
    np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in rows])
    np.testing.assert_allclose(line.get_ydata(), [r["value"] for r in rows], rtol=1e-12)
    assert line.get_color() == OPTIMIZER_COLORS["sgd"]
    (threshold,) = _dashed(ax)
    np.testing.assert_allclose(threshold.get_ydata(), (2 + 2 * MOMENTUM) / SGD_LR, rtol=1e-12)
    np.testing.assert_array_equal(threshold.get_xdata(), [r["step"] for r in rows])
    (bars,) = ax.containers
    segments = bars.lines[2][0].get_segments()
    half = [0.5 * (s[1, 1] - s[0, 1]) for s in segments]
    np.testing.assert_allclose(half, [r["error_bound"] for r in rows], rtol=1e-9)
    assert ax.get_xlabel() == "Training step" and r"\lambda_{\max}(H)" in ax.get_ylabel()


def test_several_runs_keep_their_optimizer_colour_and_order(runs):
    """A list of run folders is labelled by each run's config.json optimizer, in OPTIMIZER_ORDER (SGD before
    ZSharp whatever the order given); only SGD's rows carry a lambda_max threshold (Adam's is for P^-1 H),
    so the one dashed line is in SGD's colour."""
    ax = plot_sharpness_over_training([runs / "zsharp", runs / "sgd"])
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert labels == ["SGD", "ZSharp"]
    zsharp = _jsonl(runs / "zsharp", "lambda_max")
    np.testing.assert_allclose(_line(ax, "ZSharp").get_ydata(), [r["value"] for r in zsharp], rtol=1e-12)
    assert _line(ax, "ZSharp").get_color() == OPTIMIZER_COLORS["zsharp"]
    assert [ln.get_color() for ln in _dashed(ax)] == [OPTIMIZER_COLORS["sgd"]]


def test_preconditioned_threshold_is_adams_edge_of_stability(runs):
    """For ZSharp with an Adam base the dashed line is (2 + 2 beta1)/((1 - beta1) lr) = 38/lr = 3800 (on a
    log axis, asked for: a threshold within ten times the values is drawn there)."""
    rows = _jsonl(runs / "zsharp", "preconditioned")
    ax = plot_sharpness_over_training({"zsharp": runs / "zsharp"}, "preconditioned", log=True)
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(_line(ax, "ZSharp").get_ydata(), [r["value"] for r in rows], rtol=1e-12)
    (threshold,) = _dashed(ax)
    np.testing.assert_allclose(threshold.get_ydata(), 3.8 / ((1 - 0.9) * ADAM_LR), rtol=1e-12)


def _frame(values, threshold=None):
    out = pd.DataFrame({"step": np.arange(len(values)) * 10, "measure": "lambda_max", "value": values})
    if threshold is not None:
        out["threshold"] = threshold
    return out


def test_dataframe_rows_log_scale_and_off_scale_threshold():
    """A DataFrame of rows: values spanning more than a decade get a log axis, less a linear one; one
    threshold shared by all runs is one grey line; a threshold far above the values is not drawn but named
    in the legend, with its value."""
    wide = pd.concat([_frame([1.0, 5.0, 30.0], 40.0).assign(optimizer="sgd"),
                      _frame([2.0, 4.0, 8.0], 40.0).assign(optimizer="sam")])
    ax = plot_sharpness_over_training(wide)
    assert ax.get_yscale() == "log"
    (threshold,) = _dashed(ax)
    assert threshold.get_color() == "0.35"
    np.testing.assert_allclose(_line(ax, "SAM").get_ydata(), [2.0, 4.0, 8.0])
    narrow = plot_sharpness_over_training(_frame([3.0, 4.0, 5.0], 1000.0))
    assert narrow.get_yscale() == "linear" and not _dashed(narrow)
    texts = [t.get_text() for t in narrow.figure.legends[0].get_texts()]
    assert any("1e+03" in t and "off scale" in t for t in texts)


@pytest.mark.parametrize("data, measure, needle", [
    ("sgd", "preconditioned", "no tracked 'preconditioned' rows"),
    ("sgd", "sharpness", "measure must be one of"),
    ("untracked", "lambda_max", "tracking file not found"),
    ({}, "lambda_max", "mapping is empty"),
])
def test_bad_input_is_one_line(runs, tmp_path, data, measure, needle):
    """No tracked rows of the measure, an unknown measure, a folder without tracking.jsonl, nothing given:
    one UserInputError line saying what is wrong."""
    if isinstance(data, str):
        data = runs / data if data == "sgd" else tmp_path
    with pytest.raises(UserInputError, match=needle) as info:
        plot_sharpness_over_training(data, measure)
    assert "\n" not in str(info.value)


def test_mask_heatmap_draws_the_tracked_masks_rows(runs):
    """plot_mask_heatmap on a tracking.jsonl draws the per-layer thresholds of the tracked masks rows
    (layers x steps, in model order), as parsed from the file; a run without masks rows is one line."""
    rows = _jsonl(runs / "zsharp", "masks")
    layers = list(rows[0]["layers"])
    expected = np.array([[r["layers"][layer]["threshold"] for r in rows] for layer in layers])
    ax = plot_mask_heatmap(runs / "zsharp" / "tracking.jsonl", "threshold")
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected, rtol=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == [name.removesuffix(".weight") for name in layers]
    assert set(tracked_masks(runs / "zsharp")["step"]) == {r["step"] for r in rows}
    with pytest.raises(UserInputError, match="no tracked 'masks' rows"):
        tracked_masks(runs / "sgd")


def test_figures_command_draws_the_tracked_figures(runs, tmp_path):
    """`sharpscope figures` on analysed checkpoints of runs that tracked draws sharpness_over_training,
    preconditioned_sharpness and the tracked-masks heatmap of the ZSharp run (found through the
    checkpoint's run folder, not the results folder)."""
    results, figs = tmp_path / "results", tmp_path / "figs"
    checkpoints = [str(runs / name / "last.pt") for name in ("sgd", "zsharp")]
    assert main(["analyze", *checkpoints, "--masks", "--samples", "32", "--batch-size", "32", "--quiet",
                 "--out", str(results)]) == 0
    assert main(["figures", str(results), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    stems = {p.stem for p in figs.glob("*.png")}
    assert {"sharpness_over_training", "preconditioned_sharpness", "tracked_masks_zsharp"} <= stems
    assert "tracked_masks_sgd" not in stems


def test_a_damaged_tracking_log_is_skipped_with_a_warning(runs, tmp_path):
    """A tracking.jsonl with a line that is not JSON costs its own figures only: a RuntimeWarning naming
    the run, and the other run's figure is still drawn."""
    from sharpscope.commands.figures import _tracking_jobs

    bad = tmp_path / "bad" / "tracking.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 0, "measure": "lambda_max", "value": 1.0}\n{not json\n')
    with pytest.warns(RuntimeWarning, match="skipped the tracked rows of bad"):
        jobs = _tracking_jobs({"bad": bad, "sgd": runs / "sgd" / "tracking.jsonl"}, pd.DataFrame({"run": []}))
    assert [stem for stem, _ in jobs] == ["sharpness_over_training"]
    ax = jobs[0][1]().axes[0]
    assert [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")] == ["SGD"]


# --- tracked rows stored by `analyze`, and `figures` on run folders ---------------------------------------
@pytest.fixture(scope="module")
def analysed(runs, tmp_path_factory):
    """The two runs copied elsewhere, analysed from there (--masks, tiny), then moved away: what is left
    is a results folder whose checkpoints' run folders no longer exist."""
    import shutil

    root = tmp_path_factory.mktemp("analysed")
    copies, results = root / "runs", root / "results"
    shutil.copytree(runs, copies)
    checkpoints = [str(copies / name / "last.pt") for name in ("sgd", "zsharp")]
    assert main(["analyze", *checkpoints, "--masks", "--samples", "32", "--batch-size", "32", "--quiet",
                 "--out", str(results)]) == 0
    copies.rename(root / "moved")
    return results


def _json_rows(folder):
    """tracking.jsonl parsed with json: the scalar rows and the tidy per-layer values, as plain frames."""
    records = [json.loads(line) for line in (folder / "tracking.jsonl").read_text().splitlines() if line]
    rows = pd.DataFrame([{k: v for k, v in r.items() if k != "layers"} for r in records])
    layers = pd.DataFrame([{"step": r["step"], "measure": r["measure"], "layer": layer, "key": k, "value": v}
                           for r in records for layer, vals in r.get("layers", {}).items() for k, v in vals.items()])
    return rows, layers


@pytest.mark.parametrize("name", ["sgd", "zsharp"])
def test_analyze_stores_the_tracked_rows_and_load_reads_them_back(runs, analysed, name):
    """analyze writes <run>__tracking.nc; sharpscope.load gives a TrackingResult whose rows equal the run's
    tracking.jsonl parsed with json (and read_tracking of it), per-layer masks values included, with the
    checkpoint it was stored for; no temporary file is left next to it."""
    import sharpscope
    from sharpscope.track import read_tracking, read_tracking_layers

    path = analysed / f"{name}__tracking.nc"
    result = sharpscope.load(path)
    assert type(result).__name__ == "TrackingResult" and result.provenance
    expected_rows, expected_layers = _json_rows(runs / name)
    pd.testing.assert_frame_equal(result.to_dataframe(), expected_rows, check_dtype=False)
    pd.testing.assert_frame_equal(result.to_dataframe(), read_tracking(runs / name))
    pd.testing.assert_frame_equal(result.layer_dataframe(), read_tracking_layers(runs / name))
    if name == "zsharp":
        pd.testing.assert_frame_equal(result.layer_dataframe("masks"), expected_layers, check_dtype=False)
        assert set(result.table["layer"]) > {""}  # the per-layer values are in the long table itself
    assert result.n_rows == len(expected_rows)
    assert result.settings["checkpoint"]["path"].endswith(f"{name}/last.pt")
    assert sorted(p.name for p in analysed.iterdir() if not p.name.endswith(".nc")) == []


def test_a_fresh_process_opens_the_tracking_file_with_sharpscope_load(analysed):
    """sharpscope.load alone (nothing else imported) knows the 'tracking' kind: a new interpreter opens the
    file and counts the rows of the jsonl."""
    import subprocess
    import sys

    code = "import sys, sharpscope; r = sharpscope.load(sys.argv[1]); print(type(r).__name__, r.n_rows)"
    out = subprocess.run([sys.executable, "-c", code, str(analysed / "sgd__tracking.nc")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n = len(list(filter(None, (analysed.parent / "moved" / "sgd" / "tracking.jsonl").read_text().splitlines())))
    assert out.stdout.split() == ["TrackingResult", str(n)]


def test_figures_draw_the_tracked_rows_stored_in_the_results_after_the_runs_moved(runs, analysed, tmp_path):
    """The run folders are gone (moved), so the tracked figures can only come from <run>__tracking.nc: the
    figures are drawn, and the SGD line is the (step, value) of the jsonl parsed with json."""
    from sharpscope.commands.figures import _load_results, _tracking_jobs, split_runs, tracked_runs
    from sharpscope.commands.summary import result_files, summary_table

    assert not (analysed.parent / "runs").exists()
    figs = tmp_path / "figs"
    assert main(["figures", str(analysed), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    stems = {p.stem for p in figs.glob("*.png")}
    assert {"sharpness_over_training", "preconditioned_sharpness", "tracked_masks_zsharp"} <= stems
    found = split_runs(_load_results(result_files(analysed)))
    jobs = dict(_tracking_jobs(tracked_runs(analysed, [], found), summary_table(analysed)))
    ax = jobs["sharpness_over_training"]().axes[0]
    rows = _jsonl(runs / "sgd", "lambda_max")
    np.testing.assert_allclose(_line(ax, "SGD").get_ydata(), [r["value"] for r in rows], rtol=1e-12)


@pytest.mark.parametrize("folder", ["runs", "one run"])
def test_figures_on_run_folders_not_analysed_draw_the_tracked_sharpness(runs, tmp_path, folder):
    """A folder of run folders (or one run folder) with tracking.jsonl and metrics.jsonl but no .nc: the
    tracked figures and the training curves are drawn instead of the "analyse first" refusal."""
    given = runs if folder == "runs" else runs / "zsharp"
    figs = tmp_path / "figs"
    assert main(["figures", str(given), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    stems = {p.stem for p in figs.glob("*.png")}
    assert {"sharpness_over_training", "training_curves", "tracked_masks_zsharp"} <= stems
    assert ("preconditioned_sharpness" in stems) and not list(given.rglob("*.nc"))


def test_figures_refuse_run_folders_with_nothing_to_draw_in_one_line(tmp_path, capsys):
    """A run folder whose tracking.jsonl and metrics.jsonl are still empty (no tracked row, no finished
    epoch): exit 2 and one line saying to analyse first (a runs folder that never tracked is refused too:
    tests/test_commands.py)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    (tmp_path / "run" / "tracking.jsonl").write_text("")
    assert main(["figures", str(tmp_path), "--out", str(tmp_path / "figs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "analyse them first" in err[0] and "no sharpscope result files" in err[0]
    assert not (tmp_path / "figs").exists()


def test_tracking_result_keeps_rows_without_values_and_layer_only_rows(tmp_path):
    """Rows written by hand (one with no value at all, one with per-layer values only, a repeated step) come
    back from save/load as the same rows, in the same order, as the TrackRow objects given."""
    import sharpscope
    from sharpscope.track import TrackRow
    from sharpscope.track.result import TrackingResult

    given = [TrackRow(0, "lambda_max", {"value": 2.5, "residual": 1e-3}),
             TrackRow(0, "trace", {}),
             TrackRow(3, "masks", {}, layers={"0.weight": {"kept_fraction": 0.05}, "2.weight": {"threshold": 1.7}}),
             TrackRow(3, "lambda_max", {"value": 3.25})]
    path = TrackingResult.from_rows(given, {"run": "hand"}).save(tmp_path / "hand__tracking.nc")
    loaded = sharpscope.load(path)
    assert [(r.step, r.measure, r.values, r.layers) for r in loaded.rows()] == \
        [(r.step, r.measure, r.values, r.layers) for r in given]
    assert loaded.n_rows == 4 and loaded.settings["run"] == "hand"
    assert list(loaded.to_dataframe()["measure"]) == ["lambda_max", "trace", "masks", "lambda_max"]
