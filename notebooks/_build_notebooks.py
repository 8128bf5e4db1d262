"""Write the six tutorial notebooks (``python notebooks/_build_notebooks.py``).

The ``.ipynb`` files are the deliverable; this script is their source, kept so that an edit to a
notebook is an edit to plain Python strings that review well. Notebooks are written without outputs
or execution counts; ``tests/test_notebooks.py`` executes them and checks that they stay clean.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sharpscope._io import atomic_write_text

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str, parameters: bool = False) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip("\n"))
    if parameters:
        cell.metadata["tags"] = ["parameters"]
    return cell


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    # Stable cell ids keep diffs small when the notebooks are regenerated.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def imports(*extra: str) -> nbformat.NotebookNode:
    """A notebook's own import cell (each notebook stays standalone): the common imports plus the
    ``extra`` ones it uses, of ``"time"``, ``"numpy"``, ``"pandas"``."""
    optional = {"time": "import time", "numpy": "import numpy as np", "pandas": "import pandas as pd"}
    pick = {key: [line] if key in extra else [] for key, line in optional.items()}
    lines = ["%matplotlib inline", "import tempfile", *pick["time"], "from pathlib import Path", "",
             *pick["numpy"], *pick["pandas"], "import torch", "import torch.nn.functional as F", "",
             "import sharpscope as ss", "from sharpscope import plot as ssplot"]
    return code("\n".join(lines))


# Shared snippet: where the notebook writes (never into the repository).
OUT_SETUP = '''
OUT = Path(OUT_DIR) if OUT_DIR is not None else Path(tempfile.mkdtemp(prefix="sharpscope_"))
OUT.mkdir(parents=True, exist_ok=True)
print("writing to", OUT)
'''

# ---------------------------------------------------------------------------------------------------
QUICKSTART = [
    md("""
# 01 · Quickstart: train with ZSharp and SAM, measure sharpness, plot

This notebook trains the same tiny network twice on the bundled 8x8 **digits** data — once with
**SAM** and once with **ZSharp** (SAM whose ascent step keeps only the gradient entries with a large
layer-wise Z-score) — then measures how sharp each solution is and draws the paper-style figures.
Everything runs on a laptop CPU in well under a minute; change the parameters cell to scale up.
"""),
    code('''
# Parameters (papermill-style: this cell is tagged "parameters").
DATASET = "digits"          # bundled, nothing to download; "cifar10" needs the files under DATA_ROOT
DATA_ROOT = None            # folder with the dataset files (None: $SHARPSCOPE_DATA or ./data)
MODEL = "mlp"               # any name in sharpscope.MODEL_NAMES
MODEL_KWARGS = {"hidden": [32, 32]}
OPTIMIZERS = ["sam", "zsharp"]
EPOCHS = 4
BATCH_SIZE = 64
LR = 0.05                   # SGD with momentum 0.9 is the base optimizer
RHO = 0.05                  # SAM/ZSharp radius
PERCENTILE = 0.95           # ZSharp keeps the entries with |z| above this quantile of |z|
SEED = 0
ANALYSIS_EXAMPLES = 512     # training examples used for the Hessian and sharpness
TOP_K = 3                   # number of top Hessian eigenvalues
OUT_DIR = None              # None: a fresh temporary folder
PROGRESS = False            # progress bars (tqdm)
''', parameters=True),
    imports("pandas"),
    code(OUT_SETUP),
    md("""
## 1. Data and training

`ss.load_dataset` returns an in-memory `TensorData` split; `ss.fit` runs the two-pass SAM-family step
(ascend to `w + e(w)`, then descend with the gradient there) and writes a run folder per optimizer:
`last.pt`/`best.pt` checkpoints, `metrics.jsonl` and — for ZSharp — `masks.csv`, the log of what the
Z-score filter kept.
"""),
    code('''
train = ss.load_dataset(DATASET, root=DATA_ROOT, train=True)
test = ss.load_dataset(DATASET, root=DATA_ROOT, train=False)
print(f"{train.name}: {len(train)} images of shape {train.image_shape}, {train.num_classes} classes; "
      f"{test.name}: {len(test)} images")

runs = {}
for name in OPTIMIZERS:
    torch.manual_seed(SEED)  # the initial weights: the same for every optimizer
    model = ss.build_model(MODEL, num_classes=train.num_classes, **MODEL_KWARGS)
    runs[name] = ss.fit(model, train, test, optimizer=name, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR,
                        rho=RHO, percentile=PERCENTILE, seed=SEED, device="cpu", out=OUT / name,
                        log_mask_every=5, progress=PROGRESS)

pd.DataFrame({name: run.history[-1] for name, run in runs.items()}).T[
    ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "time_s"]]
'''),
    md("""
**Reading the table:** one row per optimizer, the metrics of the last epoch. ZSharp's step costs about
as much as SAM's (two forward/backward passes) plus the Z-score filter.

The training curves below come straight from the run folders (`metrics.jsonl`): test curves are
solid, train curves dashed, and each optimizer keeps the same colour in every figure of sharpscope.
"""),
    code('''
with ss.style("neurips"):
    fig = ssplot.plot_training_curves({name: OUT / name for name in runs})
    ss.save_figure(fig, OUT / "training_curves")
'''),
    md("""
## 2. Open the checkpoints and measure sharpness

A checkpoint rebuilds its model by itself (`ck.model`, in eval mode), so the analysis below works the
same on a checkpoint trained on a GPU days ago. We compute, on a fixed set of training examples:

* `hessian_eigenvalues` — the top-`k` eigenvalues of the loss Hessian (Lanczos), with residuals;
* `hessian_trace` — `tr(H)` by Hutch++, with a standard error;
* `sharpness` — the worst-case loss increase within an L2 ball of radius `rho` (projected gradient ascent).

Lower numbers mean a flatter minimum.
"""),
    code('''
checkpoints = {name: ss.load_checkpoint(OUT / name / "last.pt") for name in runs}
data = train.subset(range(min(ANALYSIS_EXAMPLES, len(train)))).loader(batch_size=256)
loss_fn = F.cross_entropy

eigen, trace, rows = {}, {}, []
for name, ck in checkpoints.items():
    eigen[name] = ss.hessian_eigenvalues(ck.model, loss_fn, data, k=TOP_K, seed=SEED, progress=PROGRESS)
    trace[name] = ss.hessian_trace(ck.model, loss_fn, data, n_samples=30, seed=SEED, progress=PROGRESS)
    sharp = ss.sharpness(ck.model, loss_fn, data, rho=RHO, kind="worst", steps=10, seed=SEED)
    rows.append({"optimizer": name, "test_acc": ck.history[-1]["test_acc"],
                 "lambda_max": eigen[name].eigenvalues[0], "residual": eigen[name].residuals[0],
                 "trace": trace[name].estimate, "trace_stderr": trace[name].stderr,
                 "sharpness_worst": sharp.value, "base_loss": sharp.base_loss})
summary = pd.DataFrame(rows).set_index("optimizer")
summary
'''),
    md("""
`residual` is `||H v - lambda v|| / |lambda|` for the top pair: small values mean the eigenvalue is
trustworthy. `trace_stderr` is one standard error of the trace estimate — compare two traces only when
their difference is several standard errors.

## 3. The spectrum at a glance

Stochastic Lanczos quadrature gives the whole eigenvalue density; the triangles mark the top
eigenvalues found above. A sharper solution has its outliers further to the right.
"""),
    code('''
density = {name: ss.hessian_density(ck.model, loss_fn, data, n_iter=30, n_runs=1, seed=SEED, progress=PROGRESS)
           for name, ck in checkpoints.items()}
with ss.style("neurips"):
    ax = ssplot.plot_density(density, eigenvalues=eigen)
    ss.save_figure(ax.figure, OUT / "density")
'''),
    md("""
## 4. What did ZSharp's filter keep?

`masks.csv` holds, every few steps, the statistics of the ZSharp mask for each filtered tensor (the
weight matrices; biases are never filtered). Left panel: the fraction of entries kept; the tick on each
row is what the rule `|z| > Q_p(|z|)` keeps of that layer's `n` distinct values, `n - 1 - floor(p (n - 1))`,
which is more than `1 - percentile` for small tensors (2 of 22 entries at `p = 0.95`). Right panel: each
layer's share of the perturbation norm under ZSharp next to SAM's share (the gradient's).
"""),
    code('''
mask_log = ss.load_mask_log(OUT / "zsharp", model=checkpoints["zsharp"].model) if "zsharp" in runs else None
if mask_log is not None:
    with ss.style("neurips"):
        fig = ssplot.plot_mask_summary(mask_log, percentile=PERCENTILE)
        ss.save_figure(fig, OUT / "mask_summary")
    display(mask_log.groupby("layer", sort=False)[["kept_fraction", "perturbation_norm"]].mean())
'''),
    md("""
## 5. Where things are

Every figure was saved as PDF + PNG (300 dpi) under `OUT`; each run folder holds its checkpoints and
logs. Next: `02_hessian_spectrum` (the curvature tools in depth), `03_loss_landscapes`,
`04_which_layers_does_zsharp_select` and `05_compare_checkpoints` (point it at your own runs).
"""),
    code('''
sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file())
'''),
]

# ---------------------------------------------------------------------------------------------------
# A tiny ZSharp run so that notebooks 02-04 work standalone when no checkpoint is given.
TRAIN_IF_NEEDED = '''
train = ss.load_dataset(DATASET, root=DATA_ROOT, train=True)
if CHECKPOINT is None:
    torch.manual_seed(SEED)
    model = ss.build_model(MODEL, num_classes=train.num_classes, **MODEL_KWARGS)
    ss.fit(model, train, ss.load_dataset(DATASET, root=DATA_ROOT, train=False), optimizer="zsharp",
           epochs=EPOCHS, batch_size=64, lr=0.05, seed=SEED, device="cpu", out=OUT / "zsharp",
           log_mask_every=2, progress=PROGRESS)
    CHECKPOINT = OUT / "zsharp" / "last.pt"
ck = ss.load_checkpoint(CHECKPOINT)
model = ck.model
data = train.subset(range(min(ANALYSIS_EXAMPLES, len(train)))).loader(batch_size=BATCH_SIZE)
loss_fn = F.cross_entropy
n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"{CHECKPOINT}: {ck.spec['name'] if ck.spec else type(model).__name__}, {n_params} parameters, "
      f"epoch {ck.epoch}, optimizer {ck.optimizer_config.get('name', '?')}")
'''

SPECTRUM = [
    md("""
# 02 · The Hessian spectrum: top eigenvalues, trace, density, per layer

How curved is the loss at a trained solution? This notebook computes the top Hessian eigenvalues
(with their residuals), the trace (with error bars), the full spectral density and the curvature of
each layer, and puts sharpscope's numbers side by side with **PyHessian**'s (`backend="pyhessian"`),
so you can check that both tools agree on your model before trusting either.
"""),
    code('''
# Parameters
CHECKPOINT = None           # a .pt from `sharpscope train`; None: train a tiny ZSharp model first
DATASET = "digits"          # the data the Hessian is measured on (the checkpoint's training set)
DATA_ROOT = None
MODEL = "cnn"               # used only when CHECKPOINT is None
MODEL_KWARGS = {"width": 8}
EPOCHS = 3
ANALYSIS_EXAMPLES = 256     # training examples the Hessian is averaged over
BATCH_SIZE = 256
TOP_K = 4
TRACE_BUDGETS = [12, 24, 48]  # Hessian-vector products per trace estimate
DENSITY_ITER = 40           # Lanczos steps per SLQ run
DENSITY_RUNS = 2
SEED = 0
OUT_DIR = None
PROGRESS = False
''', parameters=True),
    imports("time", "numpy", "pandas"),
    code(OUT_SETUP),
    code(TRAIN_IF_NEEDED),
    md("""
## 1. Top eigenvalues, and the same with PyHessian

sharpscope runs Lanczos on exact Hessian-vector products accumulated over all batches of `data`;
PyHessian runs power iteration with deflation. Both should give the same top eigenvalues to a few
digits. `residual` is `||H v - lambda v|| / |lambda|` (sharpscope's own check); `n_hvp` is the cost in
Hessian-vector products, each one about two forward/backward passes over `data`.
"""),
    code('''
start = time.perf_counter()
eig = ss.hessian_eigenvalues(model, loss_fn, data, k=TOP_K, tol=1e-4, seed=SEED, progress=PROGRESS)
t_ours = time.perf_counter() - start
start = time.perf_counter()
eig_ph = ss.hessian_eigenvalues(model, loss_fn, data, k=TOP_K, tol=1e-4, max_iter=100, seed=SEED,
                                backend="pyhessian", progress=PROGRESS)
t_ph = time.perf_counter() - start

table = eig.to_dataframe().set_index("rank")[["eigenvalue", "residual", "converged"]]
table["pyhessian"] = eig_ph.eigenvalues
table["relative_difference"] = np.abs(table["eigenvalue"] - table["pyhessian"]) / np.abs(table["eigenvalue"])
print(f"sharpscope: {eig.n_hvp} HVPs in {t_ours:.2f}s; PyHessian: {eig_ph.n_hvp} HVPs in {t_ph:.2f}s")
table
'''),
    md("""
## 2. The trace, with error bars

`tr(H)` is the sum of all eigenvalues (the average curvature times the dimension). It is estimated
from random probes, so it comes with a standard error. Hutch++ (the default) spends a third of its
budget on a sketch of the top eigenspace and is exact there; plain Hutchinson averages `z^T H z` over
Rademacher vectors. Hutch++ pays off once its sketch (a third of the budget) is large enough to hold
the few dominant eigenvalues; at the smallest budgets here (a dozen products: a sketch of four
vectors) its error bar can be as large as Hutchinson's or larger, so read the table below rather than
assume a winner. PyHessian's Hutchinson has no error bar of its own.
"""),
    code('''
rows = []
for budget in TRACE_BUDGETS:
    for method in ("hutch++", "hutchinson"):
        tr = ss.hessian_trace(model, loss_fn, data, n_samples=budget, method=method, seed=SEED, progress=PROGRESS)
        rows.append({"method": method, "n_hvp": tr.n_hvp, "estimate": tr.estimate, "stderr": tr.stderr})
tr_ph = ss.hessian_trace(model, loss_fn, data, n_samples=max(TRACE_BUDGETS), backend="pyhessian", seed=SEED,
                         progress=PROGRESS)
traces = pd.DataFrame(rows)
print(f"PyHessian Hutchinson: {tr_ph.estimate:.4g} after {tr_ph.n_hvp} HVPs")

with ss.style("neurips"):
    fig, ax = ssplot.new_figure()
    for i, (method, group) in enumerate(traces.groupby("method", sort=False)):
        ax.errorbar(group["n_hvp"] + 0.6 * i, group["estimate"], yerr=group["stderr"], marker="o",
                    capsize=3, label=method)
    ax.axhline(tr_ph.estimate, color="0.5", linestyle=":", label="PyHessian")
    ax.set(xticks=TRACE_BUDGETS, xlabel="Hessian-vector products", ylabel="tr(H) estimate (± 1 s.e.)")
    ax.legend()
    ss.save_figure(fig, OUT / "trace_error_bars")
traces
'''),
    md("""
## 3. The spectral density

Stochastic Lanczos quadrature smooths the Ritz values of a few Lanczos runs into a density. Read it
on its log axis: the bulk near zero holds almost all eigenvalues, the few outliers on the right are
the sharp directions (the triangles are the top eigenvalues from step 1; they should sit on the right
edge). PyHessian's SLQ on the same model, overlaid, should show the same bulk and edge.
"""),
    code('''
dens = ss.hessian_density(model, loss_fn, data, n_iter=DENSITY_ITER, n_runs=DENSITY_RUNS, seed=SEED,
                          progress=PROGRESS)
dens_ph = ss.hessian_density(model, loss_fn, data, n_iter=DENSITY_ITER, n_runs=DENSITY_RUNS, seed=SEED,
                             backend="pyhessian", progress=PROGRESS)
with ss.style("neurips"):
    ax = ssplot.plot_density({"sharpscope": dens, "PyHessian": dens_ph},
                             eigenvalues={"sharpscope": eig, "PyHessian": eig_ph})
    ss.save_figure(ax.figure, OUT / "density")
print("largest Ritz value:", max(n.max() for n in dens.nodes), "vs top eigenvalue", eig.eigenvalues[0])
'''),
    md("""
## 4. Curvature per layer

`layer_curvature` takes each parameter tensor's diagonal block of the Hessian (the curvature seen when
only that tensor moves) and reports its top eigenvalue and trace. Layers with large values are where a
small weight change costs the most loss — and where a sharpness-aware perturbation matters most.
"""),
    code('''
layers = ss.layer_curvature(model, loss_fn, data, n_trace_samples=24, seed=SEED, progress=PROGRESS)
ss.save_layer_curvature(layers, OUT / "layer_curvature.nc")
with ss.style("neurips"):
    ax = ssplot.plot_layer_curvature(layers)
    ss.save_figure(ax.figure, OUT / "layer_curvature")
layers[["layer", "numel", "top_eigenvalue", "trace", "trace_stderr", "trace_method"]]
'''),
    md("""
## 5. Results are files

Every result saves to a self-describing netCDF file (numbers plus the settings, seeds and model
fingerprint that made them) and loads back without recomputation — redraw a figure on another machine.
"""),
    code('''
eig.save(OUT / "eigenvalues.nc")
dens.save(OUT / "density.nc")
again = ss.EigenResult.load(OUT / "eigenvalues.nc")
assert np.allclose(again.eigenvalues, eig.eigenvalues)
sorted(p.name for p in OUT.iterdir() if p.is_file())
'''),
]

# ---------------------------------------------------------------------------------------------------
LANDSCAPES = [
    md("""
# 03 · Loss landscapes: 1-D and 2-D slices, interpolation, sharpness

Pictures of the loss around a solution, following Li et al. (2018): slices along random Gaussian
directions rescaled filter by filter to the weights (so that models of different scale are
comparable), slices along the top Hessian eigenvectors (the sharpest directions), a 2-D contour and 3-D
surface, and the straight line from the SAM solution to the ZSharp one. Sharpness numbers close it.
"""),
    code('''
# Parameters
CHECKPOINTS = {}            # {"sam": "runs/sam/last.pt", "zsharp": "runs/zsharp/last.pt"}; {}: train tiny runs
DATASET = "digits"
DATA_ROOT = None
MODEL = "mlp"               # used only when CHECKPOINTS is empty
MODEL_KWARGS = {"hidden": [32, 32]}
EPOCHS = 4
ANALYSIS_EXAMPLES = 512     # training examples the loss is evaluated on at each grid point
BATCH_SIZE = 256
STEPS_1D = 21               # points per 1-D slice, on [-SPAN, SPAN]
GRID_2D = 11                # points per axis of the 2-D slices
SPAN = 1.0
RHO = 0.05                  # radius of the sharpness measures
SEED = 0
OUT_DIR = None
PROGRESS = False
''', parameters=True),
    imports("numpy", "pandas"),
    code(OUT_SETUP),
    code('''
train = ss.load_dataset(DATASET, root=DATA_ROOT, train=True)
if not CHECKPOINTS:
    test = ss.load_dataset(DATASET, root=DATA_ROOT, train=False)
    for name in ("sam", "zsharp"):
        torch.manual_seed(SEED)  # the same initial weights for both optimizers
        net = ss.build_model(MODEL, num_classes=train.num_classes, **MODEL_KWARGS)
        ss.fit(net, train, test, optimizer=name, epochs=EPOCHS, batch_size=64, lr=0.05, seed=SEED,
               device="cpu", out=OUT / name, progress=PROGRESS)
        CHECKPOINTS[name] = OUT / name / "last.pt"
models = {name: ss.load_checkpoint(path).model for name, path in CHECKPOINTS.items()}
data = train.subset(range(min(ANALYSIS_EXAMPLES, len(train)))).loader(batch_size=BATCH_SIZE)
loss_fn = F.cross_entropy
steps = np.linspace(-SPAN, SPAN, STEPS_1D)
grid = np.linspace(-SPAN, SPAN, GRID_2D)
list(models)
'''),
    md("""
## 1. 1-D slices along a random filter-normalised direction

`landscape_1d` evaluates loss and accuracy at `w + x d` for each `x`. The direction `d` is Gaussian,
rescaled so each filter (row of a weight matrix) has the norm of the corresponding filter of `w`;
biases and normalisation layers are left alone (`ignore="biasbn"`). With the same `seed` each model gets
its own direction drawn the same way, so a flatter curve means a flatter minimum at that scale.
"""),
    code('''
random_1d = {name: ss.landscape_1d(m, loss_fn, data, steps=steps, seed=SEED, progress=PROGRESS)
             for name, m in models.items()}
with ss.style("neurips", "double"):
    fig = ssplot.plot_landscape_1d_panels(random_1d)
    ss.save_figure(fig, OUT / "landscape_1d_random")
'''),
    md("""
## 2. 1-D slices along the top Hessian eigenvector

A random direction mostly sees the flat bulk of the spectrum; the top eigenvector is the sharpest
direction there is. `eigen_directions` rescales the unit eigenvector by `||w||`, so `x = 1` is a move as
large as the weights themselves, in the same units as the random slice. Expect a much narrower valley.
"""),
    code('''
eigen_dirs = {name: ss.eigen_directions(m, loss_fn, data, n=2, seed=SEED) for name, m in models.items()}
eigen_1d = {name: ss.landscape_1d(m, loss_fn, data, direction=eigen_dirs[name][0], steps=steps / 4,
                                  progress=PROGRESS)
            for name, m in models.items()}
with ss.style("neurips"):
    ax = ssplot.plot_landscape_1d(eigen_1d)
    ax.set_xlabel("step along the top eigenvector (units of ||w||)")
    ss.save_figure(ax.figure, OUT / "landscape_1d_eigen")
pd.Series({name: d[0].meta["eigenvalue"] for name, d in eigen_dirs.items()}, name="top eigenvalue")
'''),
    md("""
## 3. 2-D slices: contour and surface

Two random filter-normalised directions span a plane through `w` (the star). The panels share their
contour levels, so equal colours mean equal loss in every panel; wider rings mean a flatter basin.
The 3-D surface shows the same grid for one model; the second plane is spanned by the top two
eigenvectors, the sharpest plane through `w`.
"""),
    code('''
random_2d = {name: ss.landscape_2d(m, loss_fn, data, x=grid, y=grid, seed=SEED, progress=PROGRESS)
             for name, m in models.items()}
with ss.style("neurips", "double"):
    fig = ssplot.plot_contours(random_2d)
    ss.save_figure(fig, OUT / "contours_random")
'''),
    code('''
last = list(models)[-1]
eigen_2d = ss.landscape_2d(models[last], loss_fn, data, directions=eigen_dirs[last], x=grid / 4, y=grid / 4,
                           progress=PROGRESS)
with ss.style("neurips", "double"):
    fig, (ax_surface, ax_contour) = ssplot.new_figure(ncols=2, aspect=0.4, subplot_kw=None)
    ax_surface.remove()
    ax_surface = fig.add_subplot(1, 2, 1, projection="3d")
    ssplot.plot_surface(random_2d[last], ax=ax_surface, title=f"{last}: random plane")
    ssplot.plot_contour(eigen_2d, ax=ax_contour)
    ax_contour.set_title(f"{last}: top-2 eigenvector plane")
    ss.save_figure(fig, OUT / "surface_and_eigen_plane")
'''),
    md("""
## 4. Interpolation between the two solutions

The loss along `(1 - alpha) w_A + alpha w_B` (Goodfellow et al. 2015), extrapolated a little on both
sides (shaded). A barrier in the middle means the two optimizers ended in different basins; a flat,
low path means they found the same connected valley.
"""),
    code('''
names = list(models)
if len(names) >= 2:
    a, b = names[0], names[1]
    alphas = np.arange(-4, 21) / 16  # -0.25 .. 1.25, with 0 and 1 on the grid
    path = ss.interpolate(models[a], models[b], loss_fn, data, alphas=alphas, progress=PROGRESS)
    with ss.style("neurips"):
        ax = ssplot.plot_interpolation(path, endpoints=(a, b))
        ss.save_figure(ax.figure, OUT / "interpolation")
    inside = path.loss[(alphas >= 0) & (alphas <= 1)]
    print(f"loss barrier between the end points: {inside.max() - max(inside[0], inside[-1]):.4f}")
'''),
    md("""
## 5. Sharpness numbers

Two summaries of the same question, in loss units, over the same training examples:
`worst` is `max_{||e|| <= rho} L(w + e) - L(w)` found by projected gradient ascent (the quantity SAM
minimises); `average` is `E L(w + e) - L(w)` over random `e` of norm `rho`, with its standard error.
`adaptive=True` measures in ASAM's scale-invariant ball `|T^-1 e| <= rho`, `T = |w|`.
"""),
    code('''
rows = []
for name, m in models.items():
    for kind, adaptive in (("worst", False), ("average", False), ("worst", True)):
        res = ss.sharpness(m, loss_fn, data, rho=RHO, kind=kind, adaptive=adaptive, steps=10, n_samples=10,
                           seed=SEED)
        rows.append({"optimizer": name, **res.to_dataframe().iloc[0].to_dict()})
pd.DataFrame(rows).set_index(["optimizer", "kind", "adaptive"])[["value", "stderr", "base_loss"]]
'''),
    md("""
Each landscape saves to netCDF with its directions' settings and loads back for redrawing:
"""),
    code('''
random_2d[last].save(OUT / f"landscape_2d_{last}.nc")
ss.Landscape.load(OUT / f"landscape_2d_{last}.nc")
'''),
]

# ---------------------------------------------------------------------------------------------------
LAYERS = [
    md("""
# 04 · Which layers does ZSharp select?

ZSharp standardises each weight tensor's gradient into Z-scores and perturbs only the entries whose
`|z|` exceeds the `percentile` quantile. This notebook looks at what that filter sees and does: the
per-layer Z-score distributions, the mask statistics at a checkpoint, the masks logged during training,
and how well each optimizer's ascent direction lines up with the sharpest Hessian directions.
"""),
    code('''
# Parameters
CHECKPOINT = None           # a .pt from `sharpscope train`; None: train a tiny ZSharp model first
RUN_DIR = None              # the run folder holding masks.csv (None: the checkpoint's folder)
DATASET = "digits"
DATA_ROOT = None
MODEL = "cnn"               # used only when CHECKPOINT is None
MODEL_KWARGS = {"width": 8}
EPOCHS = 3
ANALYSIS_EXAMPLES = 512
BATCH_SIZE = 128            # Z-scores and masks are per batch, as in training
PERCENTILE = 0.95
RHO = 0.05
TOP_K = 3                   # eigenvectors for the alignment
SEED = 0
OUT_DIR = None
PROGRESS = False
''', parameters=True),
    imports(),
    code(OUT_SETUP),
    code(TRAIN_IF_NEEDED),
    md("""
## 1. Z-score distributions per layer

For each batch, each filtered tensor's gradient is standardised, `z = (g - mean) / std`, and the
histogram is pooled over batches. The grey dashed curve is the standard normal; the dotted lines are the
threshold `±tau` with `tau = Q_p(|z|)`, and the shaded tails are what ZSharp keeps. Heavy tails (excess
kurtosis > 0, more mass beyond 3 than a Gaussian) mean the filter keeps a few very large entries.
"""),
    code('''
zs = ss.gradient_zscores(model, loss_fn, data, percentile=PERCENTILE, progress=PROGRESS)
with ss.style("neurips", "double"):
    fig = ssplot.plot_zscore_distributions(zs, percentile=PERCENTILE)
    ss.save_figure(fig, OUT / "zscores")
zs.to_dataframe()[["layer", "numel", "std", "skewness", "excess_kurtosis", "threshold", "gaussian_threshold",
                   "p_abs_z_gt_3", "gaussian_p_abs_z_gt_3"]]
'''),
    md("""
## 2. The mask at this checkpoint

`mask_statistics` applies ZSharp's filter to the gradient of each batch (exactly as `first_step`
does, on scratch copies) and averages: `kept_fraction` (`n - 1 - floor(p (n - 1))` of a tensor's `n`
distinct values: close to `1 - percentile` for large tensors, more for small ones, e.g. 11 of 216 at 0.95),
`energy_kept` (the share of the gradient's squared norm the mask keeps — large when the tails are heavy),
`perturbation_share_tensor` (the layer's share of the ZSharp perturbation: every filtered tensor gets
norm `rho`, so small layers get a large share), `mask_jaccard` (how stable the mask is from batch to
batch) and `fallback_rate` (batches where the mask was empty and the layer fell back to SAM).
"""),
    code('''
stats = ss.mask_statistics(model, loss_fn, data, percentile=PERCENTILE, rho=RHO, progress=PROGRESS)
stats[["layer", "numel", "kept_fraction", "energy_kept", "perturbation_share_tensor",
       "perturbation_share_global", "mask_jaccard", "fallback_rate"]]
'''),
    md("""
## 3. The mask over training

During training `fit` logged the mask every few steps (`log_mask_every`) to `masks.csv`. The kept fraction
and the perturbation norm are fixed by construction (by `p` and the layer's size, and by `rho`), so they are
not drawn over training; the heatmaps show what does change: the threshold `tau` (how heavy the tails are)
and the gradient norm per layer (rows) and step (columns). The summary averages over the log and puts
ZSharp's perturbation share next to SAM's (the gradient's share).
"""),
    code('''
run_dir = Path(RUN_DIR) if RUN_DIR is not None else Path(CHECKPOINT).parent
if (run_dir / "masks.csv").is_file():
    log = ss.load_mask_log(run_dir, model=model)
    with ss.style("neurips", "double"):
        fig, (ax_heat, ax_norm) = ssplot.new_figure(ncols=2, aspect=0.4)
        ssplot.plot_mask_heatmap(log, value="threshold", ax=ax_heat)
        ssplot.plot_mask_heatmap(log, value="grad_norm", ax=ax_norm)
        ss.save_figure(fig, OUT / "mask_heatmaps")
    with ss.style("neurips", "double"):
        fig = ssplot.plot_mask_summary(log, percentile=PERCENTILE)
        ss.save_figure(fig, OUT / "mask_summary")
else:
    print(f"no masks.csv in {run_dir}: train with optimizer='zsharp' and log_mask_every > 0 to get one")
'''),
    md("""
## 4. Do the ascent directions find the sharp directions?

Each method's ascent `e` (all rescaled to norm `rho`) is compared with the top-`k` Hessian eigenvectors:
`cos_v1..` are `|cos(e, v_i)|`, `cos_subspace` is the norm of `e`'s projection on their span over `||e||`,
`directional_curvature` is `e^T H e / ||e||^2` and `loss_increase` is `L(w + e) - L(w)`. `random` is
the chance level. A higher value means the method spends its perturbation budget where the loss is sharpest.
"""),
    code('''
align = ss.perturbation_alignment(model, loss_fn, data, k=TOP_K, rho=RHO, percentile=PERCENTILE, seed=SEED,
                                  progress=PROGRESS)
table = align.to_dataframe().set_index("method")
per_layer = align.layer_dataframe()
per_layer = per_layer[(per_layer["eigenvector"] == 1) & per_layer["method"].isin(["sam", "zsharp", "random"])]
with ss.style("neurips"):
    fig = ssplot.plot_alignment_summary(align)  # the whole-model comparison (sharpscope demo's figure)
    ss.save_figure(fig, OUT / "alignment_summary")
with ss.style("neurips"):
    ax = ssplot.plot_alignment(per_layer.rename(columns={"method": "optimizer"}), values="cos_subspace",
                               xlabel="cosine with the top-k eigenspace")
    ss.save_figure(ax.figure, OUT / "alignment")
display(per_layer.pivot(index="layer", columns="method", values="norm_share").loc[per_layer["layer"].unique()])
table
'''),
    md("""
**Reading the figures and tables:** the first figure compares the methods on the whole model: the part
of each ascent direction in the top-`k` eigenspace and the loss it gains at radius `rho`. In the second,
per layer, the bars are how much of each method's perturbation in that layer lies in the top-`k`
eigenspace (the layer's part of it). The first table is each layer's share
`||e_l||^2 / ||e||^2` of the perturbation: SAM follows the gradient's spread, ZSharp's per-tensor
normalisation spreads it evenly over the filtered tensors (biases and BatchNorm get little). The last
table is the whole-model comparison described above.
"""),
]

# ---------------------------------------------------------------------------------------------------
COMPARE = [
    md("""
# 05 · Compare checkpoints

Point this notebook at several checkpoints — for example CIFAR-10 ResNet runs trained on a GPU with
`sharpscope train --optimizer zsharp ...` — and get one comparison table (accuracy, top eigenvalue,
trace, sharpness) and the comparison figures. With `CHECKPOINTS = []` it trains three tiny digits runs
(SGD, SAM, ZSharp) into a temporary folder, so it also runs standalone.
"""),
    code('''
# Parameters
CHECKPOINTS = []            # e.g. ["runs/sgd/best.pt", "runs/sam/best.pt", "runs/zsharp/best.pt"]
LABELS = None               # names for the checkpoints (None: their optimizer, e.g. "zsharp")
DATASET = None              # None: the dataset the checkpoints were trained on
DATA_ROOT = None            # where CIFAR/Tiny-ImageNet files live (None: $SHARPSCOPE_DATA or ./data)
DEVICE = "cpu"              # "cuda" for big models
ANALYSIS_EXAMPLES = 512     # training examples used for curvature, sharpness and landscapes
BATCH_SIZE = 256
TOP_K = 3
TRACE_SAMPLES = 30
STEPS_1D = 21
RHO = 0.05
SEED = 0
# Only used when CHECKPOINTS is empty (the standalone demo):
DEMO_OPTIMIZERS = ["sgd", "sam", "zsharp"]
DEMO_EPOCHS = 4
OUT_DIR = None
PROGRESS = False
''', parameters=True),
    imports("numpy", "pandas"),
    code(OUT_SETUP),
    code('''
if not CHECKPOINTS:
    demo_train, demo_test = ss.load_dataset("digits"), ss.load_dataset("digits", train=False)
    for name in DEMO_OPTIMIZERS:
        torch.manual_seed(SEED)  # the same initial weights for every optimizer
        net = ss.build_model("mlp", num_classes=10, hidden=[32, 32])
        ss.fit(net, demo_train, demo_test, optimizer=name, epochs=DEMO_EPOCHS, batch_size=64, lr=0.05, seed=SEED,
               device="cpu", out=OUT / "runs" / name, progress=PROGRESS)
        CHECKPOINTS.append(OUT / "runs" / name / "last.pt")

loaded = [ss.load_checkpoint(path) for path in CHECKPOINTS]
for ck in loaded:
    ck.model.to(DEVICE)
labels = list(LABELS) if LABELS is not None else [ck.optimizer_config.get("name", Path(ck.path).stem)
                                                   for ck in loaded]
if len(set(labels)) < len(labels):  # the same optimizer twice: add the folder and file names
    labels = [f"{label} ({Path(ck.path).parent.name}/{Path(ck.path).stem})" for label, ck in zip(labels, loaded)]
if len(set(labels)) < len(labels):
    labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
checkpoints = dict(zip(labels, loaded))

trained_on = {ck.raw.get("data", {}).get("train", "").split("/")[0] for ck in loaded}
if DATASET is None and (len(trained_on) != 1 or "" in trained_on):
    raise ValueError(f"the checkpoints were trained on {sorted(trained_on)}; set DATASET to the data to compare them on")
dataset = DATASET or trained_on.pop()
train = ss.load_dataset(dataset, root=DATA_ROOT, train=True)
data = train.subset(range(min(ANALYSIS_EXAMPLES, len(train)))).loader(batch_size=BATCH_SIZE, device=DEVICE)
loss_fn = F.cross_entropy
pd.DataFrame({"path": [str(ck.path) for ck in loaded], "model": [ck.spec["name"] if ck.spec else "?" for ck in loaded],
              "epochs": [ck.epoch for ck in loaded]}, index=labels)
'''),
    md("""
## 1. Training curves

From the history stored in each checkpoint: test solid, train dashed, one colour per optimizer.
"""),
    code('''
with ss.style("neurips", "double"):
    fig = ssplot.plot_training_curves({label: pd.DataFrame(ck.history) for label, ck in checkpoints.items()})
    ss.save_figure(fig, OUT / "training_curves")
'''),
    md("""
## 2. The comparison table

One row per checkpoint, all measured on the same `ANALYSIS_EXAMPLES` training examples. `lambda_max` is
the top Hessian eigenvalue (with its Lanczos residual), `trace` the Hutch++ estimate of `tr(H)` with its
standard error, `sharpness_worst` the largest loss increase within radius `RHO`, `sharpness_avg` the
mean increase over random directions of that norm. Lower curvature and sharpness at equal accuracy is
the flatter solution. The table is also written to `comparison.csv`.

Read it with care: these are single runs (one seed each) of a few epochs on a small data set, so a
ranking here is not evidence. It can well show SGD both the flattest and the most accurate; whether
ZSharp or SAM is flatter, and more accurate, is a question for several seeds per optimizer, compared as
mean ± s.d. (`sharpscope sweep --seeds 0,1,2` trains and draws exactly that).
"""),
    code('''
rows, eigen, density = [], {}, {}
for label, ck in checkpoints.items():
    m = ck.model
    eigen[label] = ss.hessian_eigenvalues(m, loss_fn, data, k=TOP_K, seed=SEED, progress=PROGRESS)
    tr = ss.hessian_trace(m, loss_fn, data, n_samples=TRACE_SAMPLES, seed=SEED, progress=PROGRESS)
    worst = ss.sharpness(m, loss_fn, data, rho=RHO, kind="worst", steps=10, seed=SEED)
    avg = ss.sharpness(m, loss_fn, data, rho=RHO, kind="average", n_samples=10, seed=SEED)
    density[label] = ss.hessian_density(m, loss_fn, data, n_iter=30, seed=SEED, progress=PROGRESS)
    last = ck.history[-1] if ck.history else {}
    rows.append({"checkpoint": label, "test_acc": last.get("test_acc", np.nan), "train_loss": worst.base_loss,
                 "lambda_max": eigen[label].eigenvalues[0], "residual": eigen[label].residuals[0],
                 "trace": tr.estimate, "trace_stderr": tr.stderr, "sharpness_worst": worst.value,
                 "sharpness_avg": avg.value, "sharpness_avg_stderr": avg.stderr})
comparison = pd.DataFrame(rows).set_index("checkpoint")
comparison.to_csv(OUT / "comparison.csv")
comparison
'''),
    md("""
## 3. Spectra and 1-D slices side by side

First the Hessian eigenvalue densities overlaid (triangles: the top eigenvalues), then the loss along
one random filter-normalised direction per model, drawn with the same seed.
"""),
    code('''
slices = {label: ss.landscape_1d(ck.model, loss_fn, data, steps=STEPS_1D, seed=SEED, progress=PROGRESS)
          for label, ck in checkpoints.items()}
with ss.style("neurips"):
    ax = ssplot.plot_density(density, eigenvalues=eigen)
    ss.save_figure(ax.figure, OUT / "densities")
    ax = ssplot.plot_landscape_1d(slices)
    ss.save_figure(ax.figure, OUT / "slices_1d")
'''),
    md("""
## 4. Curvature per layer

The top eigenvalue of each tensor's diagonal Hessian block, per checkpoint: which layers got flatter.
"""),
    code('''
per_layer = {label: ss.layer_curvature(ck.model, loss_fn, data, n_trace_samples=12, seed=SEED, progress=PROGRESS)
             for label, ck in checkpoints.items()}
with ss.style("neurips"):
    ax = ssplot.plot_layer_curvature(per_layer)
    ss.save_figure(ax.figure, OUT / "layer_curvature")
sorted(p.name for p in OUT.iterdir() if p.is_file())
'''),
]

# ---------------------------------------------------------------------------------------------------
TRANSFORMER = [
    md("""
# 06 · A transformer: its Hessian spectrum and which layers ZSharp selects

Second-order analyses work on transformers as on any model: inside every analysis that differentiates
twice, attention runs on PyTorch's math kernel (the fused flash/memory-efficient kernels have no double
backward), which costs memory for the attention matrix but nothing else. This notebook trains a tiny
**12-block ViT** (sharpscope's `vit`, the ZSharp paper's architecture at toy width) for a few ZSharp steps,
computes its Hessian spectrum, and shows ZSharp's layer selection **grouped by block and by kind**
(attention / MLP / embedding), the way a 12-block model reads at a glance.
"""),
    code('''
# Parameters
CHECKPOINT = None           # a transformer .pt from `sharpscope train`; None: train a tiny ViT first
DATASET = "digits"          # 8x8 grey images, bundled; CIFAR checkpoints: "cifar10" (needs DATA_ROOT)
DATA_ROOT = None
MODEL = "vit"               # used only when CHECKPOINT is None
MODEL_KWARGS = {"image_size": 8, "patch_size": 2, "in_channels": 1, "dim": 16, "depth": 12, "heads": 2,
                "mlp_dim": 32}
TRAIN_EXAMPLES = 512        # a few ZSharp steps: this is a demo of the tools, not of the training
EPOCHS = 2
LR = 3e-3                   # Adam base optimizer, as in the paper's ViT recipe
RHO = 0.05
PERCENTILE = 0.95
ANALYSIS_EXAMPLES = 128     # training examples the Hessian and the masks are measured on
BATCH_SIZE = 64             # masks are per batch, as in training
TOP_K = 3
DENSITY_ITER = 24           # Lanczos steps of the spectral density
SEED = 0
OUT_DIR = None
PROGRESS = False
''', parameters=True),
    imports("pandas"),
    code(OUT_SETUP),
    code('''
train = ss.load_dataset(DATASET, root=DATA_ROOT, train=True)
if CHECKPOINT is None:
    model = ss.build_model(MODEL, num_classes=train.num_classes, seed=SEED, **MODEL_KWARGS)
    subset = train.subset(range(min(TRAIN_EXAMPLES, len(train))))
    test = ss.load_dataset(DATASET, root=DATA_ROOT, train=False)
    ss.fit(model, subset, test, optimizer="zsharp", base="adam", lr=LR, weight_decay=5e-5, rho=RHO,
           percentile=PERCENTILE, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED, device="cpu",
           out=OUT / "zsharp", log_mask_every=2, progress=PROGRESS)
    CHECKPOINT = OUT / "zsharp" / "last.pt"
ck = ss.load_checkpoint(CHECKPOINT)
model = ck.model
data = train.subset(range(min(ANALYSIS_EXAMPLES, len(train)))).loader(batch_size=BATCH_SIZE)
loss_fn = F.cross_entropy
n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"{CHECKPOINT}: {n_params} parameters in {len(list(model.parameters()))} tensors, epoch {ck.epoch}")
'''),
    md("""
## 1. Which tensors does ZSharp filter?

ZSharp filters every tensor with `ndim > 1`: the patch embedding, the class token and the position
embedding (shaped `(1, tokens, dim)`), the attention projections (one fused `qkv` here; Hugging Face
models have separate `q`, `k`, `v`), the MLP layers and the head. Biases and LayerNorm parameters
(`ndim` 1) keep SAM's plain direction. `ss.layer_groups` names the block, kind and part of every tensor
from its name (sharpscope/timm ViT, `nn.TransformerEncoder`, Hugging Face GPT-2/BERT/ViT/LLaMA
conventions) and says whether ZSharp filters it:
"""),
    code('''
groups = ss.layer_groups(model)
display(pd.crosstab(groups["kind"], groups["filtered"].map({True: "filtered", False: "SAM direction"})))
groups[groups["block"] == 0]
'''),
    md("""
## 2. The Hessian spectrum

The top eigenvalues (Lanczos, with residuals) and the spectral density (stochastic Lanczos quadrature),
on the same training examples. The triangles are the top eigenvalues; they should sit at the right edge
of the density. A ViT this young has a bulk at zero, a few outliers, and can have negative eigenvalues
too: it is not at a minimum yet.
"""),
    code('''
eig = ss.hessian_eigenvalues(model, loss_fn, data, k=TOP_K, seed=SEED, progress=PROGRESS)
dens = ss.hessian_density(model, loss_fn, data, n_iter=DENSITY_ITER, seed=SEED, progress=PROGRESS)
with ss.style("neurips"):
    ax = ssplot.plot_density(dens, eigenvalues=eig)
    ss.save_figure(ax.figure, OUT / "density")
eig.to_dataframe().set_index("rank")[["eigenvalue", "residual", "converged"]]
'''),
    md("""
## 3. ZSharp's layer selection, by block and part

`mask_statistics` applies ZSharp's filter to each batch's gradient exactly as a training step does.
How many entries the mask keeps is fixed by `PERCENTILE` and each tensor's size (about 5 %); what it
*selects* shows in `energy_kept`, the share of the gradient's squared norm in the kept entries: near
100 % the gradient sits in a few entries (heavy tails) and ZSharp's ascent is close to SAM's on that
tensor; near 5 % it is spread evenly. `plot_layer_selection` draws one row per block and one column per
part, with the tensors outside the blocks in a strip above (embeddings) and below (head);
`layer_selection_table` returns the numbers drawn.
"""),
    code('''
stats = ss.mask_statistics(model, loss_fn, data, percentile=PERCENTILE, rho=RHO, progress=PROGRESS)
with ss.style("neurips"):
    fig = ssplot.plot_layer_selection(stats, "energy_kept")
    ss.save_figure(fig, OUT / "layer_selection")
ssplot.layer_selection_table(stats, "energy_kept").drop(columns="layers").head(8)
'''),
    md("""
## 4. Where the perturbation goes: SAM against ZSharp

From the mask log written during training (`masks.csv`), by kind and summed over each cell: SAM's
perturbation is the gradient, so a layer's share of it is its share of `||g||^2` (left); ZSharp normalises
each filtered tensor's perturbation to norm `rho`, so every tensor gets the same share and a block gets
its number of tensors' worth (right). Both panels share one logarithmic colour scale. So SAM's
perturbation follows wherever the gradient is large (often the head, early in training), while ZSharp's
is spread over every block by construction.
"""),
    code('''
from matplotlib.colors import LogNorm

run_dir = Path(CHECKPOINT).parent
if (run_dir / "masks.csv").is_file():
    log = ss.load_mask_log(run_dir, model=model)
    scale = LogNorm(0.01, 100)  # one log scale for both panels: equal colours, equal shares
    with ss.style("neurips", "double"):
        fig, ax = ssplot.new_figure(aspect=0.55)
        ax.remove()
        left, right = fig.subfigures(1, 2)
        ssplot.plot_layer_selection(log, "grad_share", by="kind", norm=scale, fig=left)
        ssplot.plot_layer_selection(log, "perturbation_share", by="kind", norm=scale, fig=right)
        left.suptitle("SAM")
        right.suptitle("ZSharp")
        ss.save_figure(fig, OUT / "perturbation_shares")
else:
    print(f"no masks.csv in {run_dir}: train with optimizer='zsharp' and log_mask_every > 0 to get one")
'''),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_hessian_spectrum.ipynb": SPECTRUM,
    "03_loss_landscapes.ipynb": LANDSCAPES,
    "04_which_layers_does_zsharp_select.ipynb": LAYERS,
    "05_compare_checkpoints.ipynb": COMPARE,
    "06_transformer_spectrum_and_zsharp.ipynb": TRANSFORMER,
}


def main(names: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = notebook(cells)
        nbformat.validate(nb)
        atomic_write_text(HERE / name, nbformat.writes(nb) + "\n")
        print("wrote", HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
