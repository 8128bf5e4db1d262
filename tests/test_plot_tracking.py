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
