"""``sharpscope analyze``, ``figures`` and ``demo`` end to end, through ``sharpscope.cli.main``.

The checkpoints are tiny digits MLPs (64-8-10, 610 parameters) trained here, so the numbers in the
result files can be checked against the exact Hessian (``torch.func.hessian`` + ``numpy.linalg.eigh``)
on the same seeded sample, rebuilt by hand in the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sharpscope.analysis.results import read_table, result_kind
from sharpscope.cli import main
from sharpscope.data import load_dataset
from sharpscope.models import build_model
from sharpscope.track import read_tracking
from sharpscope.train import fit, load_checkpoint

SAMPLES = 200
FAST = ["--samples", str(SAMPLES), "--batch-size", "100", "--top-k", "2", "--trace-samples", "12",
        "--density-iter", "12", "--density-runs", "1", "--steps-1d", "5", "--grid-2d", "5", "--quiet"]
ANALYSES = ("eigenvalues", "trace", "density", "layer_curvature", "landscape_1d", "landscape_2d", "zscores",
            "masks", "alignment", "sharpness_worst", "sharpness_average", "history")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """SGD and ZSharp runs of a 64-8-10 MLP on digits, one epoch each, same seed."""
    root = tmp_path_factory.mktemp("runs")
    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    paths = {}
    for optimizer in ("sgd", "zsharp"):
        torch.manual_seed(0)
        model = build_model("mlp", 10, in_features=64, hidden=(8,))
        fit(model, train, test, optimizer=optimizer, epochs=1, batch_size=128, lr=0.1, device="cpu",
            log_mask_every=3, progress=False, out=root / optimizer)
        paths[optimizer] = root / optimizer / "last.pt"
    return paths


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = main(["analyze", *map(str, checkpoints.values()), "--data", "digits", *FAST, "--out", str(out)])
    assert code == 0
    return out


def _exact_spectrum(path: Path) -> np.ndarray:
    """Eigenvalues of the exact Hessian of the mean cross-entropy on the analysed sample."""
    model = load_checkpoint(path).model
    data = load_dataset("digits", train=True)
    # the sample the command documents: a seeded (seed 0) random subset, in index order
    idx = torch.sort(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SAMPLES]).values
    x, y = data.subset(idx).tensors()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model.double(), params, (x.double(),)), y)

    return np.linalg.eigvalsh(torch.func.hessian(loss)(flat0).numpy())


def test_analyze_writes_one_file_per_analysis_and_checkpoint(results, checkpoints, capsys):
    """Every analysis of every checkpoint is a readable result file named <run>__<analysis>.nc, plus the
    ZSharp run's training mask log; the summary table printed at the end names both runs."""
    files = {p.name for p in results.glob("*.nc")}
    expected = {f"{run}__{a}.nc" for run in checkpoints for a in ANALYSES} | {"zsharp__mask_log.nc"}
    assert files == expected
    assert result_kind(results / "zsharp__landscape_2d.nc") == "landscape"


def test_analyze_numbers_match_the_exact_hessian(results, checkpoints):
    """lambda_max in the file is the top eigenvalue of the exact Hessian (eigh) on the same sample;
    the Hutch++ trace lies within 5 standard errors of the exact trace."""
    from sharpscope.analysis.hessian import EigenResult, TraceResult

    for run, path in checkpoints.items():
        exact = _exact_spectrum(path)
        eig = EigenResult.load(results / f"{run}__eigenvalues.nc")
        np.testing.assert_allclose(eig.eigenvalues[:2], exact[::-1][:2], rtol=2e-3)
        trace = TraceResult.load(results / f"{run}__trace.nc")
        assert abs(trace.estimate - exact.sum()) <= 5 * trace.stderr + 1e-6 * abs(exact.sum())


def test_history_and_summary_come_from_the_checkpoint(results, checkpoints):
    """The stored history is the checkpoint's; the summary's test accuracy is its last epoch's, in %."""
    from sharpscope.commands import summary_table

    table = summary_table(results).set_index("run")
    for run, path in checkpoints.items():
        history, meta = read_table(results / f"{run}__history.nc", "training_history")
        ckpt = load_checkpoint(path)
        assert meta["optimizer"]["name"] == run
        np.testing.assert_allclose(history["test_acc"], [h["test_acc"] for h in ckpt.history])
        assert table.loc[run, "test_acc"] == pytest.approx(100 * ckpt.history[-1]["test_acc"])
    assert list(table.index) == ["sgd", "zsharp"]


def test_figures_end_to_end(results, tmp_path, capsys):
    """Every comparison figure is drawn at the NeurIPS text width (5.5 in at 300 dpi), and the summary
    table is printed."""
    out = tmp_path / "figs"
    assert main(["figures", str(results), "--out", str(out), "--formats", "png", "--quiet"]) == 0
    stems = {p.stem for p in out.glob("*.png")}
    assert stems == {"spectrum", "sharpness_summary", "layer_curvature", "landscape_1d", "contours", "surface_sgd",
                     "surface_zsharp", "surfaces", "zscores", "mask_summary", "alignment", "training_curves",
                     "mask_heatmap_zsharp", "cost"}
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] == round(5.5 * 300 if not png.stem.startswith("surface_") else 2.75 * 300)
    printed = capsys.readouterr().out
    assert "| sgd |" in printed and "| zsharp |" in printed


def test_figures_style_sets_the_width(results, tmp_path):
    """--style icml draws one ICML column (3.25 in)."""
    out = tmp_path / "icml"
    assert main(["figures", str(results), "--out", str(out), "--style", "icml", "--formats", "png",
                 "--quiet"]) == 0
    with Image.open(out / "spectrum.png") as im:
        assert im.size[0] == round(3.25 * 300)


def test_figures_on_run_folders_says_to_analyse_first(checkpoints, tmp_path, capsys):
    """A folder of run folders (metrics.jsonl, no result file) is not a results folder: exit 2 and one
    line naming `sharpscope analyze` (it used to exit 0 with an empty table)."""
    out = tmp_path / "figs"
    root = checkpoints["sgd"].parent.parent
    assert main(["figures", str(root), "--out", str(out), "--formats", "png", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sharpscope result files" in err[0] and "sharpscope analyze" in err[0]


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "missing.pt", "--data", "digits"], "does not exist"),
    (["analyze", "{ckpt}", "--data", "mnist"], "unknown dataset"),
    (["analyze", "{ckpt}", "--samples", "-3"], "samples must be"),
    (["analyze", "{notckpt}"], "junk.pt"),
    (["analyze", "{ckpt}", "--interpolate"], "--interpolate needs at least 2 checkpoints"),
    (["analyze", "{ckpt}", "{ckpt}", "--interpolate", "--interp-points", "2"], "interp_points must be"),
    (["figures", "{empty}"], "nothing to draw"),
    (["figures", "{empty}/nope"], "does not exist"),
    (["figures", "{empty}", "--style", "nature"], "unknown style"),
    (["demo", "--style", "nature"], "unknown style"),
])
def test_bad_inputs_exit_2_with_one_line(argv, needle, checkpoints, tmp_path, capsys):
    """User mistakes give exit code 2 and a single error line naming the problem (no traceback)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no results here")
    notckpt = tmp_path / "junk.pt"
    notckpt.write_bytes(b"not a checkpoint")
    argv = [a.format(ckpt=checkpoints["sgd"], empty=empty, notckpt=notckpt) for a in argv]
    assert main([*argv, "--quiet"] if argv[0] != "analyze" else [*argv, "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith(f"sharpscope {argv[0]}: error:")


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    """The analysed sample as the command documents it: a seeded (seed 0) subset, in index order."""
    data = load_dataset("digits", train=True)
    idx = torch.sort(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SAMPLES]).values
    return data.subset(idx).tensors()


def test_analyze_interpolate_matches_hand_mixed_weights(checkpoints, tmp_path):
    """--interpolate alone writes only <a>--<b>__interpolation.nc; each point's loss and accuracy equal
    those of a model whose weights are mixed by hand, (1 - alpha) w_a + alpha w_b, evaluated with
    torch.func.functional_call on the same sample; figures then draws the interpolation figure."""
    from sharpscope.analysis.landscape import Landscape

    out = tmp_path / "res"
    a, b = checkpoints["sgd"], checkpoints["zsharp"]
    assert main(["analyze", str(a), str(b), "--interpolate", "--interp-points", "7", *FAST, "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.nc")} == {"sgd--zsharp__interpolation.nc"}
    line = Landscape.load(out / "sgd--zsharp__interpolation.nc")
    assert line.settings["model_a"]["optimizer"] == "sgd" and line.settings["model_b"]["optimizer"] == "zsharp"
    alphas = line.coords["alpha"]
    np.testing.assert_allclose(alphas, np.linspace(-0.25, 1.25, 7))
    x, y = _sample()
    model, wa, wb = load_checkpoint(a).model, load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    for i, alpha in enumerate(alphas):
        mixed = {k: (1 - alpha) * wa[k].double() + alpha * wb[k].double() for k in wa}
        logits = torch.func.functional_call(model.double(), mixed, (x.double(),))
        assert line.loss[i] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert line.accuracy[i] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-6)
    figs = tmp_path / "figs"
    assert main(["figures", str(out), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    assert {p.stem for p in figs.glob("*.png")} == {"interpolation"}


def test_curvature_trajectory_over_epochs(tmp_path):
    """Two runs saved every epoch (3 epochs), analysed with --hessian only: each checkpoint's result
    stores its epoch, lambda_max per epoch equals the top eigenvalue of the exact Hessian (eigh) of that
    epoch's weights, last.pt does not repeat epoch 3, and figures draws curvature_trajectory."""
    from sharpscope.analysis.hessian import EigenResult
    from sharpscope.commands.figures import _load_results, curvature_trajectory_table
    from sharpscope.commands.summary import result_files

    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    paths = []
    for optimizer in ("sgd", "zsharp"):
        torch.manual_seed(0)
        model = build_model("mlp", 10, in_features=64, hidden=(8,))
        fit(model, train, test, optimizer=optimizer, epochs=3, batch_size=128, lr=0.1, device="cpu", save_every=1,
            progress=False, out=tmp_path / optimizer)
        paths += sorted((tmp_path / optimizer).glob("epoch_*.pt")) + [tmp_path / optimizer / "last.pt"]
    out = tmp_path / "res"
    assert main(["analyze", *map(str, paths), "--hessian", *FAST, "--density-iter", "6", "--out", str(out)]) == 0
    eig = [EigenResult.load(p) for p in out.glob("*__eigenvalues.nc")]
    assert sorted(e.settings["checkpoint"]["epoch"] for e in eig) == [1, 1, 2, 2, 3, 3, 3, 3]
    table = curvature_trajectory_table(_load_results(result_files(out)))
    assert table[["optimizer", "epoch"]].values.tolist() == [["sgd", 1], ["sgd", 2], ["sgd", 3],
                                                              ["zsharp", 1], ["zsharp", 2], ["zsharp", 3]]
    for row in table.itertuples():
        exact = _exact_spectrum(tmp_path / row.optimizer / f"epoch_{row.epoch:04d}.pt")
        assert row.lambda_max == pytest.approx(exact[-1], rel=2e-3)
        assert row.trace_stderr > 0
    figs = tmp_path / "figs"
    assert main(["figures", str(out), "--out", str(figs), "--formats", "png", "--quiet"]) == 0
    assert (figs / "curvature_trajectory.png").is_file()


def test_demo_quick(tmp_path, capsys):
    """demo --quick trains the three optimizers, writes every figure (the SGD/SAM -> ZSharp interpolation
    and the lambda_max tracked during training included) and summary.md, whose rows are the three runs
    only and whose accuracies are the checkpoints' last test accuracies; lambda_max is tracked once per
    epoch (after steps 0 and ceil(1437 / 128) = 12 of the 2 epochs of batch 128)."""
    out, work = tmp_path / "figures", tmp_path / "work"
    assert main(["demo", "--quick", "--out", str(out), "--work", str(work), "--quiet"]) == 0
    assert {p.stem for p in out.glob("*.png")} >= {"spectrum", "contours", "zscores", "mask_summary", "alignment",
                                                   "training_curves", "sharpness_summary", "landscape_1d",
                                                   "interpolation", "sharpness_over_training"}
    assert {p.name for p in (work / "results").glob("*__interpolation.nc")} == {"sgd--zsharp__interpolation.nc",
                                                                                "sam--zsharp__interpolation.nc"}
    assert {p.suffix for p in out.iterdir()} == {".png", ".pdf", ".md"}
    summary = (out / "summary.md").read_text()
    header, _, *rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("|")]
    column = [h.strip() for h in header].index("test acc. (%)")
    assert [r[0].strip() for r in rows] == ["sgd", "sam", "zsharp"]
    for row in rows:
        acc = 100 * load_checkpoint(work / row[0].strip() / "last.pt").history[-1]["test_acc"]
        assert row[column].strip() == f"{acc:.1f}"
    assert pd.read_csv(work / "zsharp" / "masks.csv").shape[0] > 0
    for optimizer in ("sgd", "sam", "zsharp"):
        assert read_tracking(work / optimizer, "lambda_max")["step"].tolist() == [0, 12]


def test_analyze_layers_option_selects_the_per_layer_tensors(checkpoints, tmp_path):
    """--layers matrices keeps only the weight matrices (ndim > 1) of the MLP in the per-layer table;
    --layers none writes no per-layer file (checked against the model's own parameter shapes)."""
    from sharpscope.analysis.hessian import LayerCurvatureResult
    from sharpscope.train import load_checkpoint

    path = checkpoints["sgd"]
    matrices = [n for n, p in load_checkpoint(path).model.named_parameters() if p.dim() > 1]
    for choice in ("matrices", "none"):
        out = tmp_path / choice
        assert main(["analyze", str(path), "--data", "digits", *FAST, "--hessian", "--layers", choice,
                     "--out", str(out)]) == 0
        file = out / "sgd__layer_curvature.nc"
        if choice == "none":
            assert not file.exists() and (out / "sgd__eigenvalues.nc").exists()
        else:
            assert LayerCurvatureResult.load(file)["layer"].tolist() == matrices


def test_analyze_curvature_ggn_matches_the_exact_gauss_newton_matrix(checkpoints, tmp_path):
    """--curvature ggn: lambda_max in the file is the top eigenvalue of the exact GGN J^T H_L J on the
    analysed sample (J by jacrev of the logits; H_L = (diag(p) - p p^T) / N per example, cross-entropy)."""
    from sharpscope.analysis.hessian import EigenResult

    path = checkpoints["sgd"]
    assert main(["analyze", str(path), "--data", "digits", *FAST, "--hessian", "--layers", "none",
                 "--curvature", "ggn", "--out", str(tmp_path)]) == 0
    eig = EigenResult.load(tmp_path / "sgd__eigenvalues.nc")
    assert eig.settings["curvature"] == "ggn"
    model = load_checkpoint(path).model.double().eval()
    data = load_dataset("digits", train=True)
    idx = torch.sort(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SAMPLES]).values
    x, y = data.subset(idx).tensors()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return torch.func.functional_call(model, params, (x.double(),))

    jac = torch.func.jacrev(logits)(flat0)  # (N, C, P)
    p = torch.softmax(logits(flat0), -1).detach()
    h_loss = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(x)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, h_loss, jac)
    exact = np.linalg.eigvalsh(ggn.numpy())[::-1]
    np.testing.assert_allclose(eig.eigenvalues[:2], exact[:2], rtol=2e-3)
