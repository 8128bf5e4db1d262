"""``sharpscope analyze``: checkpoints in, one self-describing result file per analysis out.

For a checkpoint named ``<run>`` (its run folder for ``last.pt``/``best.pt``, else the file stem)
the files are ``<out>/<run>__<analysis>.nc``:

==============  ==========================================================================================
``hessian``     ``eigenvalues`` (top-k, Lanczos), ``trace`` (Hutch++ with a standard error),
                ``density`` (stochastic Lanczos quadrature), ``layer_curvature`` (per parameter tensor)
``landscape``   ``landscape_1d`` and ``landscape_2d`` (Li et al. 2018: filter-normalised random directions)
``zscores``     ``zscores``: per-layer distributions of the gradient Z-scores ZSharp filters
``masks``       ``masks``: ZSharp's mask on every batch (kept fraction, threshold, norms), one row per
                batch and layer
``alignment``   ``alignment``: SAM/ZSharp/ASAM/random ascent directions against the top-k eigenvectors
``sharpness``   ``sharpness_worst`` and ``sharpness_average``: loss increase in the ball of radius rho
==============  ==========================================================================================

Every checkpoint written by ``sharpscope train`` also gives ``history`` (its per-epoch metrics) and,
for a ZSharp run with a ``masks.csv`` next to it, ``mask_log`` (the mask statistics logged in training),
and for a run trained with ``--track`` (a ``tracking.jsonl`` next to it) ``tracking``, the rows it tracked
(:class:`~sharpscope.track.result.TrackingResult`): the tracked figures then need only the results folder.
The Hessian results also record which checkpoint they come from (``settings["checkpoint"]``: run folder,
epoch, step, optimizer), so ``sharpscope figures`` can follow the curvature of one run over training
(``sharpscope train --save-every K`` keeps the ``epoch_XXXX.pt`` to analyse).

``--interpolate`` (two or more checkpoints of the same architecture) evaluates loss and accuracy along
the straight line between each consecutive pair, ``(1 - alpha) w_a + alpha w_b`` for ``--interp-points``
values of alpha in [-0.25, 1.25] (Goodfellow et al., ICLR 2015), in eval mode, into
``<out>/<a>--<b>__interpolation.nc``. Given alone it runs only the interpolations; with analysis flags,
both. The analyses run on a fixed, seeded sample of ``--samples`` examples of the chosen split, in batches.

Before any long work every checkpoint is checked (:func:`check_ready`): finite weights, one forward
pass on two examples (a model that cannot run on the data is named with the shapes that do not
match), class labels within the model's outputs, ``--top-k``/``--density-iter`` within the parameter
count; and ``--out`` must be a writable folder. A landscape grid saves its progress in
``<out>/<run>__landscape_1d.nc.partial`` (:func:`resume_path`) while it runs: a run killed midway is
continued by the next one with the same settings (and refused, naming the file, with others).
Each analysis is one function in :data:`ANALYSIS_STEPS`, ``name -> step(job) -> written paths``.

Files written by other tools (:func:`~sharpscope.train.load_checkpoint` lists them: a bare ``state_dict``,
DDP, Lightning, timm, a training script's dict, safetensors, a Hugging Face folder) hold weights but not
the architecture: say it with ``--model NAME`` (a zoo name or ``timm:NAME``; ``--num-classes N``, default
the dataset's; the input shape of the dataset as ``sharpscope train`` passes it; ``--model-arg KEY=VALUE``
for any other option) or ``--hf PATH`` (a ``save_pretrained`` folder or a ``config.json``, built offline;
without a checkpoint the folder itself is analysed). ``--data`` also takes a ``.pt``/``.safetensors`` file
of a dict of tensors sharing their first dimension (``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``, ...), cut into batches of ``--batch-size``; the loss is then the model's own ``.loss``
(``--loss hf``, the default for a Hugging Face model given ``labels``) or the next-token cross-entropy
(``--loss lm``, the default without ``labels``).

Several processes: ``torchrun --nproc_per_node N -m sharpscope analyze ...`` takes the same arguments.
Every rank reads the same seeded sample; the Hessian, sharpness, alignment and Z-score/mask analyses
split its batches over the ranks (each product, loss and gradient all-reduced), the landscape grids
split their points; every rank holds every result, and rank 0 alone prints progress and the summary
and writes the files (the others wait at a barrier at the end). ``--device cuda`` puts rank ``r`` on
``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from .._progress import progress
from ..errors import UserInputError
from ..train.layout import RunLayout

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The analyses, in the order they run (``alignment`` reuses the eigenvectors of ``hessian``).
ANALYSES: tuple[str, ...] = ("hessian", "landscape", "zscores", "masks", "alignment", "sharpness")
HISTORY_KIND = "training_history"
MASK_LOG_KIND = "mask_log"
MASKS_KIND = "mask_statistics"
#: The coefficient range of ``--interpolate``: both end points plus a quarter of extrapolation each side.
INTERPOLATION_RANGE: tuple[float, float] = (-0.25, 1.25)
_GENERIC_STEMS = (Path(RunLayout.LAST).stem, Path(RunLayout.BEST).stem, "model", "checkpoint", "config",
                  "pytorch_model")
#: ``--data`` files of tensors (the rest of the values name a dataset).
TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".safetensors")
#: ``--loss``: the objective names of :func:`~sharpscope.analysis.objective.as_objective` offered on the command line.
LOSS_CHOICES = ("cross_entropy", "lm", "hf")


#: ``--layers``: which tensors get per-layer curvature
LAYER_CHOICES = ("all", "matrices", "none")
#: The matrices of --hessian (sharpscope.analysis.hessian.CURVATURES; not imported here to keep the CLI fast).
CURVATURES = ("hessian", "ggn")


@dataclass
class AnalysisOptions:
    """Budgets and settings of the analyses (the defaults suit a small model on a CPU).

    Attributes:
        samples: examples analysed (a seeded random subset of the split; None: all of it).
        batch_size: examples per batch (Z-scores and masks are per batch, as in training).
        seed: seeds the subset, the Lanczos start, the probes and the random directions.
        top_k, tol, max_iter: top eigenvalues to ``tol`` (relative) within ``max_iter`` products.
        trace_samples: Hutch++ budget of Hessian-vector products.
        density_iter, density_runs: Lanczos steps per probe and number of probes of the density.
        steps_1d, grid_2d, span: points of the 1-D slice, points per side of the 2-D slice, and the
            coordinate range ``[-span, span]`` along the filter-normalised directions.
        rho: radius of the ascent (alignment) and of the sharpness ball.
        percentile: ZSharp's percentile for the Z-score threshold and the mask.
        sharpness_steps, sharpness_samples: ascent steps (worst case) and random draws (average).
        interp_points: values of alpha of an interpolation, evenly spaced on :data:`INTERPOLATION_RANGE`.
        layers: per-layer curvature of ``"all"`` parameter tensors, of the weight ``"matrices"`` only
            (ndim > 1: no biases or norm scales, often most of the tensors), or ``"none"`` (skipped; on a
            ResNet-20 it was 20 of the 25 minutes of ``--hessian``).

    ``top_k`` and ``density_iter`` are also bounded by the model's number of parameters ``n``
    (the Hessian is ``n x n``: it has ``n`` eigenvalues and a Lanczos run ends after ``n`` steps);
    :func:`analyze_checkpoint` checks that once the model is known.
    """

    samples: int | None = 1024
    batch_size: int = 256
    seed: int = 0
    top_k: int = 5
    tol: float = 1e-3
    max_iter: int = 200
    trace_samples: int = 60
    density_iter: int = 80
    density_runs: int = 2
    steps_1d: int = 41
    grid_2d: int = 21
    span: float = 1.0
    rho: float = 0.05
    percentile: float = 0.95
    sharpness_steps: int = 20
    sharpness_samples: int = 20
    layers: str = "all"
    interp_points: int = 31
    curvature: str = "hessian"

    def validate(self) -> AnalysisOptions:
        """Raise :class:`UserInputError` naming the first bad setting."""
        if self.samples is not None:
            _validate.positive_int(self.samples, "samples")
        for name in ("batch_size", "top_k", "max_iter", "density_iter", "density_runs", "sharpness_steps",
                     "sharpness_samples"):
            _validate.positive_int(getattr(self, name), name)
        _validate.integer(self.trace_samples, "trace_samples", minimum=4)
        for name in ("steps_1d", "grid_2d", "interp_points"):
            _validate.integer(getattr(self, name), name, minimum=3)
        _validate.integer(self.seed, "seed", minimum=0)
        for name in ("tol", "percentile"):
            _validate.open_fraction(getattr(self, name), name)
        _validate.positive_number(self.span, "span")
        _validate.positive_number(self.rho, "rho")
        _validate.choice(self.layers, "layers", LAYER_CHOICES)
        _validate.choice(self.curvature, "curvature", CURVATURES)
        return self

    def check_model(self, model: nn.Module, what: Sequence[str] = ANALYSES) -> None:
        """Refuse budgets the model cannot have: more eigenvalues or Lanczos steps than parameters."""
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if set(what) & {"hessian", "alignment"} and self.top_k > n:
            raise UserInputError(f"top_k (--top-k) is {self.top_k} but the model has only {n} trainable "
                                 f"parameters, hence {n} Hessian eigenvalues; use --top-k {n} or less")
        if "hessian" in what and self.density_iter > n:
            raise UserInputError(f"density_iter (--density-iter) is {self.density_iter} but the model has only "
                                 f"{n} trainable parameters (a Lanczos run ends after {n} steps); use "
                                 f"--density-iter {n} or less")


def run_name(path: str | Path) -> str:
    """``runs/zsharp/last.pt`` -> ``zsharp``; ``runs/zsharp/epoch_0010.pt`` -> ``zsharp_epoch_0010``."""
    path = Path(path)
    stem, folder = path.stem, path.parent.name
    if folder in ("", "."):
        name = stem
    elif stem in _GENERIC_STEMS:
        name = folder
    else:
        name = f"{folder}_{stem}" if re.fullmatch(r"epoch_\d+", stem) else stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name).replace("__", "_") or "run"


def result_path(out_dir: str | Path, run: str, analysis: str) -> Path:
    return Path(out_dir) / f"{run}__{analysis}.nc"


def resume_path(result_file: str | Path) -> Path:
    """Where a landscape grid keeps its progress until ``result_file`` is complete (``<file>.partial``).

    A run killed midway leaves this file behind; the next run with the same settings continues it
    (the points already done are not evaluated again) and removes it once the result is written.
    The name does not end in ``.nc``, so ``sharpscope figures`` never mistakes it for a result.
    """
    result_file = Path(result_file)
    return result_file.with_name(result_file.name + ".partial")


def split_result_name(path: str | Path) -> tuple[str, str]:
    """``<run>__<analysis>.nc`` -> ``(run, analysis)``; a file without ``__`` is its own run."""
    stem = Path(path).stem
    run, sep, analysis = stem.rpartition("__")
    return (run, analysis) if sep else (stem, stem)


@dataclass
class TensorFile:
    """``--data FILE``: a dict of tensors sharing their first dimension, read from a ``.pt``/``.safetensors`` file.

    :func:`sample_batches` cuts it into dict batches (``{"input_ids": ..., "labels": ...}``).
    """

    name: str
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @classmethod
    def read(cls, path: str | Path) -> TensorFile:
        """Read and check the file: a non-empty dict of tensors with one shared, non-zero leading size."""
        path = Path(path)
        tensors = _read_tensors(path)
        if not isinstance(tensors, dict) or not tensors or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise UserInputError(f"--data {str(path)!r} must hold a dict of named tensors (e.g. input_ids, "
                                 f"attention_mask, labels); got {type(tensors).__name__}")
        sizes = {k: (int(v.shape[0]) if v.dim() else None) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            shown = ", ".join(f"{k}: {n}" for k, n in sizes.items())
            raise UserInputError(f"--data {str(path)!r}: every tensor needs the same first dimension (the "
                                 f"examples); got {shown}")
        data = cls(path.name, dict(tensors))
        if len(data) == 0:
            raise UserInputError(f"--data {str(path)!r} holds no example: nothing to analyse")
        return data

    def batches(self, samples: int | None, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """A seeded subset of ``samples`` examples (in file order) in consecutive dict batches."""
        index = _seeded_subset(len(self), samples, seed)
        return [{k: v[index[i:i + batch_size]] for k, v in self.tensors.items()}
                for i in range(0, len(index), batch_size)]


def _read_tensors(path: Path) -> Any:
    """The object of a ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors`` file."""
    if not path.is_file():
        raise UserInputError(f"--data {str(path)!r} does not exist" if not path.exists()
                             else f"--data {str(path)!r} is not a file")
    safetensors = path.suffix.lower() == ".safetensors"
    if safetensors:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserInputError("reading a .safetensors file needs safetensors: pip install safetensors") from None
    try:
        if safetensors:
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch and safetensors raise many types for a bad file)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserInputError(f"--data {str(path)!r} is not a readable {path.suffix} file of tensors: {reason}") from None


def _seeded_subset(total: int, samples: int | None, seed: int) -> torch.Tensor:
    """The sorted indices of a seeded random subset of ``min(samples, total)`` of ``total`` examples."""
    n = total if samples is None else min(int(samples), total)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:n]
    return torch.sort(order).values


def sample_batches(data: Any, samples: int | None, batch_size: int, seed: int) -> list[Any]:
    """A seeded subset of a :class:`~sharpscope.data.TensorData` (or a :class:`TensorFile`) as a list of batches.

    Anything else (one batch, a DataLoader) is used as given, all of it.
    """
    from ..analysis.batching import as_batches
    from ..data import TensorData

    if isinstance(data, TensorFile):
        return data.batches(samples, batch_size, seed)
    if not isinstance(data, TensorData):
        return as_batches(data)
    if len(data) == 0 or samples is not None and int(samples) < 1:
        raise UserInputError(f"the data {data.name!r} is empty: nothing to analyse")
    subset = data.subset(_seeded_subset(len(data), samples, seed))
    return list(subset.batches(batch_size, shuffle=False, augment=False))


def _device_batches(data: Any, options: AnalysisOptions, device: torch.device) -> list[Any]:
    from ..analysis.batching import to_device

    batches = [to_device(b, device) for b in sample_batches(data, options.samples, options.batch_size, options.seed)]
    if not batches:
        raise UserInputError("the data holds no batch: nothing to analyse")
    return batches


def _file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists, if it is not a folder."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def _result_folder(out_dir: str | Path) -> Path:
    """The results folder, created and known to be writable before any long work.

    A file in the way is a :class:`UserInputError`; a folder that cannot be created or written
    (permissions, read-only file system) raises the ``OSError``, naming the folder.
    """
    out = Path(out_dir)
    blocker = _file_in_the_way(out)
    if blocker == out:
        raise UserInputError(f"--out {str(out)!r} is a file; give a folder for the results")
    if blocker is not None:
        raise UserInputError(f"cannot create the results folder {str(out)!r}: {str(blocker)!r} is a file, "
                             "not a folder; give another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:  # name the folder, not the probe's random file name
        raise OSError(exc.errno, exc.strerror, str(out)) from None
    return out


@dataclass
class ModelChoice:
    """The architecture given on the command line (``--model``/``--hf``) for files that hold only weights.

    ``build()`` makes a fresh model; ``hf_source`` is the ``--hf`` path (analysed as it is when it is also
    the checkpoint: its own weights, or a fresh initialisation from a bare config).
    """

    build: Callable[[], nn.Module]
    hf_source: Path | None = None

    def checkpoint(self, path: Path) -> Any:
        """The checkpoint of ``path``: the ``--hf`` model itself, or ``path``'s weights loaded into a fresh model."""
        from ..train.checkpoint import Checkpoint, load_checkpoint

        if self.hf_source is not None and path.resolve() == self.hf_source.resolve():
            model = self.build()
            fmt = "huggingface" if model.sharpscope_hf.get("pretrained") else "huggingface-config"
            return Checkpoint(path=path, model=model, spec=None, state_dict=model.state_dict(), source_format=fmt)
        return load_checkpoint(path, map_location="cpu", model=self.build())


def _load(checkpoint: Any, device: torch.device, choice: ModelChoice | None = None) -> Any:
    from ..train.checkpoint import Checkpoint, load_checkpoint

    if isinstance(checkpoint, Checkpoint):
        ckpt = checkpoint
    elif choice is not None:
        ckpt = choice.checkpoint(Path(checkpoint))
    else:
        ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if ckpt.model is None:
        raise UserInputError(f"{ckpt.path}: no model could be rebuilt from the checkpoint")
    ckpt.model.to(device).eval()
    return ckpt


def check_ready(ckpt: Any, loss_fn: LossFn, batches: Sequence[Batch], options: AnalysisOptions,
                what: Sequence[str] = ANALYSES) -> None:
    """Refuse, in a second and with one line, what would fail after minutes of work.

    Non-finite weights (named), a model that cannot run on the data (one forward pass on two
    examples), class labels beyond the model's outputs, and budgets beyond the parameter count.
    """
    from ..analysis.evaluation import check_finite_parameters, check_model_accepts

    where = f"checkpoint {str(ckpt.path)!r}"
    check_finite_parameters(ckpt.model, what=f"model in {where}")
    try:
        check_model_accepts(ckpt.model, loss_fn, batches[0])
        _check_class_labels(ckpt.model, batches)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    options.check_model(ckpt.model, what)


def _check_class_labels(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Class-index targets must be below the number of outputs (on a GPU, a kernel would assert)."""
    if not isinstance(batches[0], tuple):
        return  # dict batches: the objective checks its labels
    x, y = batches[0]
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
        return
    with torch.no_grad():
        out = model(x[:1])
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return
    top = max(int(t.max()) for _, t in batches if t.numel())
    if top >= out.shape[1]:
        raise UserInputError(f"the data has class label {top} but the model has {out.shape[1]} outputs; "
                             "analyse it on the dataset it was trained on (--data)")


def checkpoint_identity(ckpt: Any, run: str) -> dict[str, Any]:
    """Where a result comes from: run name, checkpoint file, its run folder, epoch, step and optimizer."""
    path = Path(ckpt.path)
    return {"run": run, "path": str(path), "run_dir": str(path.resolve().parent), "epoch": int(ckpt.epoch),
            "step": int(ckpt.step), "optimizer": (ckpt.optimizer_config or {}).get("name"),
            "format": getattr(ckpt, "source_format", "sharpscope-checkpoint")}


# --- one function per analysis ------------------------------------------------------------------------
@dataclass
class AnalysisJob:
    """What every analysis of one checkpoint needs: the model, the data, the budgets, the output."""

    model: nn.Module
    loss_fn: LossFn
    batches: list[Batch]
    options: AnalysisOptions
    out: Path
    run: str
    source: dict[str, Any]
    show_progress: bool = True
    eigen: Any = None  # the EigenResult of "hessian", reused by "alignment"

    def path(self, analysis: str) -> Path:
        return result_path(self.out, self.run, analysis)

    @property
    def writes(self) -> bool:
        """Whether this process writes files (rank 0 of a torchrun group, or the only process)."""
        from .. import distributed as dist

        return dist.is_main()

    def save(self, result: Any, analysis: str, **kwargs: Any) -> Path:
        """``result.save(path of analysis)`` on the writing rank; the path on every rank."""
        path = self.path(analysis)
        return result.save(path, **kwargs) if self.writes else path

    @property
    def common(self) -> dict[str, Any]:
        return {"progress": self.show_progress}


def _save_table(result: Any, path: Path, kind: str, meta: dict[str, Any]) -> Path:
    """Save a table result (a :class:`~sharpscope.analysis.results.Result`, or a bare DataFrame), on rank 0."""
    from .. import distributed as dist
    from ..analysis.results import Result, write_table

    if not dist.is_main():
        return path
    if isinstance(result, Result):
        result.settings.update(meta)
        return result.save(path)
    return write_table(result, path, kind, meta)


def _hessian(job: AnalysisJob) -> list[Path]:
    from ..analysis.hessian import hessian_density, hessian_eigenvalues, hessian_trace, layer_curvature

    o, m, f, b = job.options, job.model, job.loss_fn, job.batches
    common = {**job.common, "curvature": o.curvature}
    eigen = hessian_eigenvalues(m, f, b, k=o.top_k, tol=o.tol, max_iter=o.max_iter, seed=o.seed, **common)
    eigen.settings["checkpoint"] = job.source  # figures follow one run over its epochs with it
    job.eigen = eigen
    written = [job.save(eigen, "eigenvalues", eigenvectors=False)]
    trace = hessian_trace(m, f, b, n_samples=o.trace_samples, seed=o.seed, **common)
    trace.settings["checkpoint"] = job.source
    written.append(job.save(trace, "trace"))
    density = hessian_density(m, f, b, n_iter=o.density_iter, n_runs=o.density_runs, seed=o.seed, **common)
    density.settings["checkpoint"] = job.source
    written.append(job.save(density, "density"))
    if o.layers != "none":
        chosen = (lambda name, tensor: tensor.dim() > 1) if o.layers == "matrices" else None
        layers = layer_curvature(m, f, b, tol=o.tol, max_iter=o.max_iter, seed=o.seed, layers=chosen, **common)
        written.append(_save_layer_curvature(layers, job.path("layer_curvature"), job.writes))
    return written


def _save_layer_curvature(layers: Any, path: Path, writes: bool = True) -> Path:
    from ..analysis.hessian import save_layer_curvature
    from ..analysis.results import Result

    if not writes:
        return path
    return layers.save(path) if isinstance(layers, Result) else save_layer_curvature(layers, path)


def _resumable_slice(job: AnalysisJob, analysis: str, compute: Callable[[Path], Any]) -> Path:
    """``compute(progress_file)`` saves its progress there; a file left by a killed run is continued."""
    final = job.path(analysis)
    partial = resume_path(final)
    result = compute(partial)  # the grid saves its progress on rank 0 only
    if not job.writes:
        return final
    written = result.save(final)
    partial.unlink(missing_ok=True)
    return written


def _landscape(job: AnalysisJob) -> list[Path]:
    from ..analysis.landscape import landscape_1d, landscape_2d

    o, m, f, b = job.options, job.model, job.loss_fn, job.batches
    steps = torch.linspace(-o.span, o.span, o.steps_1d).tolist()
    axis = torch.linspace(-o.span, o.span, o.grid_2d).tolist()
    return [
        _resumable_slice(job, "landscape_1d", lambda resume: landscape_1d(
            m, f, b, steps=steps, seed=o.seed, checkpoint_path=resume, **job.common)),
        _resumable_slice(job, "landscape_2d", lambda resume: landscape_2d(
            m, f, b, x=axis, y=axis, seed=o.seed, checkpoint_path=resume, **job.common)),
    ]


def _zscores(job: AnalysisJob) -> list[Path]:
    from ..analysis.gradients import gradient_zscores

    z = gradient_zscores(job.model, job.loss_fn, job.batches, percentile=job.options.percentile, **job.common)
    return [job.save(z, "zscores")]


def _masks(job: AnalysisJob) -> list[Path]:
    from ..analysis.masks import mask_statistics

    o = job.options
    with warnings.catch_warnings():  # a single batch: mask_jaccard is NaN, said in the file itself
        warnings.simplefilter("ignore", RuntimeWarning)
        table = mask_statistics(job.model, job.loss_fn, job.batches, percentile=o.percentile, rho=o.rho,
                                per_batch=True, **job.common)
    meta = {"run": job.run, "percentile": o.percentile, "rho": o.rho, "n_batches": len(job.batches)}
    return [_save_table(table, job.path("masks"), MASKS_KIND, meta)]


def _alignment(job: AnalysisJob) -> list[Path]:
    from ..analysis.masks import perturbation_alignment

    o = job.options
    eigen = job.eigen if job.eigen is not None and job.eigen.eigenvectors is not None else None
    result = perturbation_alignment(job.model, job.loss_fn, job.batches, k=o.top_k, rho=o.rho,
                                    percentile=o.percentile, eigen=eigen, seed=o.seed, tol=o.tol,
                                    max_iter=o.max_iter, **job.common)
    return [job.save(result, "alignment")]


def _sharpness(job: AnalysisJob) -> list[Path]:
    from ..analysis.sharpness import sharpness

    o, m, f, b = job.options, job.model, job.loss_fn, job.batches
    worst = sharpness(m, f, b, rho=o.rho, kind="worst", steps=o.sharpness_steps, seed=o.seed, **job.common)
    written = [job.save(worst, "sharpness_worst")]
    average = sharpness(m, f, b, rho=o.rho, kind="average", n_samples=o.sharpness_samples, seed=o.seed,
                        **job.common)
    written.append(job.save(average, "sharpness_average"))
    return written


#: Analysis name -> the function that runs it on one checkpoint and writes its files, in run order
#: (``alignment`` reuses the eigenvectors of ``hessian``).
ANALYSIS_STEPS: dict[str, Callable[[AnalysisJob], list[Path]]] = {
    "hessian": _hessian, "landscape": _landscape, "zscores": _zscores, "masks": _masks,
    "alignment": _alignment, "sharpness": _sharpness,
}
assert tuple(ANALYSIS_STEPS) == ANALYSES


def _training_records(ckpt: Any, job: AnalysisJob) -> list[Path]:
    """The checkpoint's per-epoch history and, next to it, ZSharp's training mask log and the rows it
    tracked while training (if any)."""
    from ..analysis.masks import load_mask_log
    from ..analysis.results import write_table

    written: list[Path] = []
    if ckpt.history:
        meta = {"run": job.run, "checkpoint": str(ckpt.path), "optimizer": ckpt.optimizer_config,
                "epoch": ckpt.epoch, "data": ckpt.raw.get("data", {})}
        if job.writes:
            written.append(write_table(pd.DataFrame(ckpt.history), job.path("history"), HISTORY_KIND, meta))
    log_file = RunLayout.of_checkpoint(ckpt.path).masks
    if log_file.is_file():
        try:
            log = load_mask_log(log_file, job.model)
        except UserInputError as exc:
            warnings.warn(f"mask log skipped: {exc}", RuntimeWarning, stacklevel=3)
        else:
            written.append(_save_table(log, job.path("mask_log"), MASK_LOG_KIND,
                                       {"run": job.run, "source": str(log_file)}))
    return written + _tracked_rows(ckpt, job)


def _tracked_rows(ckpt: Any, job: AnalysisJob) -> list[Path]:
    """The rows the checkpoint's run tracked while training (its ``tracking.jsonl``), stored as
    ``<run>__tracking.nc`` (:class:`~sharpscope.track.result.TrackingResult`), so the tracked figures
    need only the results folder."""
    from ..track.result import TrackingResult

    log_file = RunLayout.of_checkpoint(ckpt.path).tracking
    if not log_file.is_file():
        return []
    try:
        result = TrackingResult.read(log_file, {"run": job.run, "checkpoint": job.source})
    except UserInputError as exc:
        warnings.warn(f"tracked rows skipped: {exc}", RuntimeWarning, stacklevel=3)
        return []
    if result.n_rows == 0:
        return []  # the run has tracked nothing yet
    return [_save_table(result, job.path("tracking"), TrackingResult.KIND, {})]


def _check_analyses(what: Sequence[str]) -> list[str]:
    what = list(dict.fromkeys([what] if isinstance(what, str) else what))
    unknown = [w for w in what if w not in ANALYSIS_STEPS]
    if unknown:
        raise UserInputError(f"unknown analysis {unknown[0]!r}; choose among: {', '.join(ANALYSES)}")
    return what


def analyze_checkpoint(checkpoint: Any, data: Any, what: Sequence[str] = ANALYSES, out_dir: str | Path = "results",
                       *, name: str | None = None, options: AnalysisOptions | None = None,
                       loss_fn: LossFn = F.cross_entropy, device: str | torch.device = "cpu",
                       show_progress: bool = True) -> list[Path]:
    """Run the analyses ``what`` on one checkpoint and write one result file each; return the paths.

    Before any long work the checkpoint is checked (:func:`check_ready`): finite weights, a model
    that runs on the data, budgets within the parameter count. A landscape grid interrupted midway
    is continued from its progress file (:func:`resume_path`) by the next call with the same settings.

    Args:
        checkpoint: a checkpoint path or a loaded :class:`~sharpscope.train.Checkpoint`.
        data: a :class:`~sharpscope.data.TensorData` split or a :class:`TensorFile` (a seeded subset of
            ``options.samples`` examples is used), or one batch (``(inputs, targets)`` or a dict of tensors) /
            an iterable of batches (used whole).
        what: any of :data:`ANALYSES`.
        out_dir: folder of the result files (created).
        name: the ``<run>`` part of the file names (default: :func:`run_name` of the path).
        options: the budgets (:class:`AnalysisOptions`).
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``, or anything
            :func:`~sharpscope.analysis.objective.as_objective` takes (a name such as ``"lm"``/``"hf"`` is
            resolved against the checkpoint's model).
        device: where the model and batches go.
        show_progress: progress bars (one per analysis).
    """
    what = _check_analyses(what)
    options = (options or AnalysisOptions()).validate()
    device = torch.device(device)
    ckpt = _load(checkpoint, device)
    run = name or run_name(ckpt.path)
    out = _result_folder(out_dir)
    batches = _device_batches(data, options, device)
    loss_fn = _objective_of(loss_fn, ckpt.model)
    check_ready(ckpt, loss_fn, batches, options, what)
    job = AnalysisJob(ckpt.model, loss_fn, batches, options, out, run, checkpoint_identity(ckpt, run),
                      show_progress)
    written = _training_records(ckpt, job)
    for analysis in what:
        written += ANALYSIS_STEPS[analysis](job)
    return written


def _objective_of(loss_fn: Any, model: nn.Module) -> Any:
    """A loss named by a string becomes its objective for ``model`` (a causal LM shifts its targets)."""
    from ..analysis.objective import as_objective

    return as_objective(loss_fn, model) if isinstance(loss_fn, str) else loss_fn


def interpolation_path(out_dir: str | Path, run_a: str, run_b: str) -> Path:
    return result_path(out_dir, f"{run_a}--{run_b}", "interpolation")


def interpolate_checkpoints(checkpoint_a: Any, checkpoint_b: Any, data: Any, out_dir: str | Path = "results", *,
                            names: tuple[str, str] | None = None, options: AnalysisOptions | None = None,
                            loss_fn: LossFn = F.cross_entropy, device: str | torch.device = "cpu",
                            show_progress: bool = True) -> Path:
    """Loss and accuracy along ``(1 - alpha) w_a + alpha w_b``, written to ``<out>/<a>--<b>__interpolation.nc``.

    ``options.interp_points`` values of alpha evenly spaced on :data:`INTERPOLATION_RANGE`, evaluated in
    eval mode (``bn="eval"``) on the same seeded sample as the other analyses. The settings of the
    stored :class:`~sharpscope.analysis.landscape.Landscape` name both end points (``model_a``,
    ``model_b``: run, checkpoint, epoch, optimizer), so the figure can label them.
    """
    from ..analysis.landscape import interpolate

    options = (options or AnalysisOptions()).validate()
    device = torch.device(device)
    a, b = _load(checkpoint_a, device), _load(checkpoint_b, device)
    loss_fn = _objective_of(loss_fn, a.model)
    run_a, run_b = names or (run_name(a.path), run_name(b.path))
    if run_a == run_b:
        raise UserInputError(f"the two end points of an interpolation need different names, both are {run_a!r}")
    out = _result_folder(out_dir)
    batches = _device_batches(data, options, device)
    for end in (a, b):
        check_ready(end, loss_fn, batches, options, what=())
    alphas = np.linspace(*INTERPOLATION_RANGE, options.interp_points)
    line = interpolate(a.model, b.model, loss_fn, batches, alphas=alphas, bn="eval", progress=show_progress)
    line.settings["model_a"] = checkpoint_identity(a, run_a)
    line.settings["model_b"] = checkpoint_identity(b, run_b)
    from .. import distributed as dist

    path = interpolation_path(out, run_a, run_b)
    return line.save(path) if dist.is_main() else path


# --- the command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data import DATASET_NAMES

    d = AnalysisOptions()
    parser.add_argument("checkpoints", nargs="*", metavar="CKPT",
                        help="checkpoints to analyse: sharpscope .pt files, or weights written by other tools "
                             "(state_dict, DDP, Lightning, timm, safetensors, Hugging Face folders; say the "
                             "architecture with --model or --hf); none with --hf: the --hf model itself")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help=f"dataset: {', '.join(DATASET_NAMES)} (default: digits), or a .pt/.safetensors file "
                           f"of a dict of tensors sharing their first dimension (input_ids, attention_mask, "
                           f"labels, pixel_values, ...)")
    data.add_argument("--data-root", default=None, help="folder with the dataset files (CIFAR, Tiny-ImageNet)")
    data.add_argument("--split", choices=["train", "test"], default="train", help="split analysed (default: train)")
    data.add_argument("--samples", type=int, default=d.samples,
                      help=f"examples analysed, a seeded random subset (default {d.samples}; 0: all)")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    _add_model_arguments(parser)
    which = parser.add_argument_group("analyses (default: all)")
    for analysis in ANALYSES:
        which.add_argument(f"--{analysis}", action="store_true", help=_HELP[analysis])
    which.add_argument("--interpolate", action="store_true",
                       help="loss/accuracy on the line between consecutive checkpoints (needs 2+; "
                            "alone: only this)")
    knobs = parser.add_argument_group("settings")
    knobs.add_argument("--top-k", type=int, default=d.top_k, help=f"top eigenvalues (default {d.top_k})")
    knobs.add_argument("--trace-samples", type=int, default=d.trace_samples,
                       help=f"Hutch++ Hessian-vector products (default {d.trace_samples})")
    knobs.add_argument("--density-iter", type=int, default=d.density_iter,
                       help=f"Lanczos steps per density probe (default {d.density_iter})")
    knobs.add_argument("--density-runs", type=int, default=d.density_runs,
                       help=f"density probes (default {d.density_runs})")
    knobs.add_argument("--steps-1d", type=int, default=d.steps_1d, help=f"points of the 1-D slice ({d.steps_1d})")
    knobs.add_argument("--grid-2d", type=int, default=d.grid_2d, help=f"points per side of the 2-D slice ({d.grid_2d})")
    knobs.add_argument("--span", type=float, default=d.span, help=f"slice coordinates in [-span, span] ({d.span})")
    knobs.add_argument("--rho", type=float, default=d.rho, help=f"ascent / sharpness radius (default {d.rho})")
    knobs.add_argument("--interp-points", type=int, default=d.interp_points,
                       help=f"values of alpha in [-0.25, 1.25] for --interpolate (default {d.interp_points})")
    knobs.add_argument("--percentile", type=float, default=d.percentile,
                       help=f"ZSharp percentile for Z-scores and masks (default {d.percentile})")
    knobs.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random choice (default {d.seed})")
    knobs.add_argument("--layers", choices=LAYER_CHOICES, default=d.layers,
                       help="per-layer curvature (part of --hessian) of all tensors, of weight matrices only, "
                            "or none (default all)")
    knobs.add_argument("--curvature", choices=CURVATURES, default=d.curvature,
                       help="matrix of --hessian: the Hessian (default) or the generalised Gauss-Newton "
                            "J^T H_loss J (positive semi-definite; needs a loss on the model's outputs)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="results", help="folder for the result files (default: results)")
    run.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models import HF_TASKS, MODEL_NAMES

    model = parser.add_argument_group("model (for files of weights only, e.g. written by other tools)")
    model.add_argument("--model", default=None, metavar="NAME",
                       help=f"architecture of the checkpoints: {', '.join(MODEL_NAMES)}, or timm:NAME (built by "
                            f"timm, untrained; pip install timm)")
    model.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help="outputs of --model (default: the dataset's number of classes)")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of --model, e.g. width=16 or hidden=[64,64] (JSON values; repeatable); "
                            "the dataset's input shape is passed as sharpscope train does")
    model.add_argument("--hf", default=None, metavar="PATH",
                       help="a Hugging Face save_pretrained folder or config.json, built offline with "
                            "transformers (pip install 'sharpscope[hf]')")
    model.add_argument("--task", choices=tuple(HF_TASKS), default=None,
                       help="head of the --hf model (default: the architecture its config names)")
    model.add_argument("--loss", choices=LOSS_CHOICES, default=None,
                       help="cross_entropy (classification), lm (next-token cross-entropy) or hf (the model's "
                            "own .loss); default: hf for a Hugging Face model given labels, lm without, else "
                            "cross_entropy")


_HELP = {
    "hessian": "top eigenvalues, trace, spectral density, per-layer curvature",
    "landscape": "1-D and 2-D loss-landscape slices",
    "zscores": "per-layer gradient Z-score distributions",
    "masks": "ZSharp mask statistics per batch and layer",
    "alignment": "ascent directions vs. top Hessian eigenvectors",
    "sharpness": "worst-case and average-case sharpness",
}


def options_from_args(args: argparse.Namespace) -> AnalysisOptions:
    return AnalysisOptions(samples=None if args.samples == 0 else args.samples, batch_size=args.batch_size,
                           seed=args.seed, top_k=args.top_k, trace_samples=args.trace_samples,
                           density_iter=args.density_iter, density_runs=args.density_runs, steps_1d=args.steps_1d,
                           grid_2d=args.grid_2d, span=args.span, rho=args.rho,
                           percentile=args.percentile, interp_points=args.interp_points,
                           layers=args.layers, curvature=args.curvature).validate()


def _checkpoint_paths(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """The checkpoint files (each must exist) and their unique ``<run>`` names."""
    from ..train.checkpoint import is_hf_folder

    paths = [Path(p) for p in args.checkpoints] or ([Path(args.hf)] if args.hf else [])
    if not paths:
        raise UserInputError("give at least one checkpoint to analyse (or --hf PATH to analyse that model)")
    if args.interpolate and len(paths) < 2:
        raise UserInputError(f"--interpolate needs at least 2 checkpoints (it follows the line between "
                             f"consecutive ones), got {len(paths)}")
    for path in paths:  # fail before the slow part
        if args.hf and path == Path(args.hf) or is_hf_folder(path):
            continue
        if not path.is_file():
            raise UserInputError(f"checkpoint {str(path)!r} does not exist" if not path.exists()
                                 else f"checkpoint {str(path)!r} is not a file (nor a Hugging Face "
                                      f"save_pretrained folder)")
    names = [run_name(p) for p in paths]
    if len(set(names)) < len(names):  # two last.pt in folders of the same name: fall back to full paths
        names = [re.sub(r"[^A-Za-z0-9_.+-]", "_", str(p.with_suffix(""))).strip("_") for p in paths]
    return paths, names


def _device(name: str) -> torch.device:
    """``--device``; under torchrun a CUDA device is the rank's own ``cuda:LOCAL_RANK``."""
    from .. import distributed as dist
    from ..train.loop import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and dist.is_distributed():
        return dist.device_for_rank()
    return device


def run(args: argparse.Namespace) -> int:
    """The command; under torchrun it joins the process group first (rank 0 prints and writes)."""
    from .. import distributed as dist
    from ..train.checkpoint import MissingModelError

    joined = not dist.is_initialized() and dist.init_from_env()
    try:
        return _run(args)
    except MissingModelError as exc:  # the Python advice (model=/spec=) means nothing on the command line
        raise UserInputError(f"{str(exc.path)!r} holds weights but not which model they belong to: say it with "
                             f"--model NAME --num-classes N (a zoo name or timm:NAME) or --hf PATH") from None
    finally:
        if joined:
            dist.destroy()


def _is_tensor_file(value: str) -> bool:
    return Path(value).suffix.lower() in TENSOR_FILE_SUFFIXES


def _read_data(args: argparse.Namespace) -> Any:
    """``--data``: a dataset split, or a :class:`TensorFile`."""
    from ..data import load_dataset

    if _is_tensor_file(args.data):
        return TensorFile.read(args.data)
    return load_dataset(args.data, root=args.data_root, train=args.split == "train")


def _check_model_flags(args: argparse.Namespace) -> None:
    """Refuse contradictory model flags before any file is read."""
    if args.model and args.hf:
        raise UserInputError("give either --model (a zoo or timm model) or --hf (a Hugging Face model), not both")
    if not args.hf and args.task:
        raise UserInputError("--task chooses the head of an --hf model; add --hf PATH or drop --task")
    if not args.model and (args.num_classes is not None or args.model_arg):
        flag = "--num-classes" if args.num_classes is not None else "--model-arg"
        raise UserInputError(f"{flag} describes the --model to build; add --model NAME or drop {flag}")
    if args.num_classes is not None:
        _validate.positive_int(args.num_classes, "--num-classes")


def model_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["width=16", "hidden=[64,64]"]`` -> ``{"width": 16, "hidden": [64, 64]}`` (JSON values, else strings)."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserInputError(f"--model-arg {pair!r} must be KEY=VALUE, e.g. width=16")
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


def _model_choice(args: argparse.Namespace, data: Any) -> ModelChoice | None:
    """What ``--model``/``--hf`` say the checkpoints hold (None: the files say it themselves)."""
    from ..data import TensorData
    from ..models import MODEL_NAMES, build_model, canonical_model_name, hf_model
    from ..train.command import model_kwargs

    if args.hf:
        return ModelChoice(lambda: hf_model(args.hf, task=args.task), hf_source=Path(args.hf))
    if not args.model:
        return None
    name = canonical_model_name(args.model)
    num_classes = args.num_classes or getattr(data, "num_classes", None)
    if num_classes is None:
        raise UserInputError(f"--model {args.model} needs --num-classes N with --data {args.data} (the file "
                             f"does not say how many classes)")
    # the dataset's input shape, as `sharpscope train` passes it (timm models take their own names)
    kwargs = model_kwargs(name, data) if isinstance(data, TensorData) and name in MODEL_NAMES else {}
    kwargs.update(model_options(args.model_arg))
    return ModelChoice(lambda: build_model(name, num_classes, **kwargs))


def _loss_for(args: argparse.Namespace, model: nn.Module, batches: Sequence[Any]) -> Any:
    """``--loss`` (default: ``hf`` for a Hugging Face model given labels, ``lm`` without, else cross-entropy)."""
    from ..analysis.objective import as_objective
    from ..models.hf import is_hf_model

    name = args.loss
    if name is None:
        dict_batches = isinstance(batches[0], dict)
        if is_hf_model(model) and dict_batches:
            name = "hf" if "labels" in batches[0] else "lm"
        else:
            name = "cross_entropy"
    return as_objective(name, model)


def _run(args: argparse.Namespace) -> int:
    from .. import distributed as dist
    from ..data import canonical_dataset_name
    from .summary import print_summary

    options = options_from_args(args)
    quiet = args.quiet or not dist.is_main()
    what = [a for a in ANALYSES if getattr(args, a)] or ([] if args.interpolate else list(ANALYSES))
    _check_model_flags(args)
    paths, names = _checkpoint_paths(args)
    if not _is_tensor_file(args.data):
        canonical_dataset_name(args.data)
    _result_folder(args.out)  # an unwritable --out is refused before the data is even read
    data = _read_data(args)
    choice = _model_choice(args, data)
    device = _device(args.device)
    start = time.perf_counter()
    batches = _device_batches(data, options, device)  # the same seeded sample for every checkpoint
    loaded = {0: _load(paths[0], device, choice)}
    loss = _loss_for(args, loaded[0].model, batches)
    if len(paths) > 1:  # every checkpoint is checked before the first one's long work starts
        for path in paths:
            check_ready(_load(path, device, choice), loss, batches, options, what)
    written: list[Path] = []
    if what:
        for i, (path, name) in enumerate(progress(list(zip(paths, names)), enabled=not quiet, desc="checkpoints")):
            ckpt = loaded.pop(i, None) or _load(path, device, choice)
            written += analyze_checkpoint(ckpt, batches, what, args.out, name=name, options=options, device=device,
                                          loss_fn=loss, show_progress=not quiet)
    if args.interpolate:
        previous = loaded.pop(0, None) or _load(paths[0], device, choice)  # each is read once along the chain
        for i in range(len(paths) - 1):
            current = _load(paths[i + 1], device, choice)
            written.append(interpolate_checkpoints(previous, current, batches, args.out,
                                                   names=(names[i], names[i + 1]), options=options,
                                                   device=device, loss_fn=loss, show_progress=not quiet))
            previous = current
    dist.barrier()  # the others wait until rank 0 has written everything
    if not dist.is_main():
        return 0
    done = what + (["interpolate"] if args.interpolate else [])
    print(f"wrote {len(written)} result files to {args.out} in {time.perf_counter() - start:.1f} s "
          f"({', '.join(done)}; {data.name}, settings: {_short(asdict(options))})", file=sys.stderr)
    print_summary(args.out)
    return 0


def _short(settings: dict[str, Any]) -> str:
    keys = ("samples", "top_k", "rho", "percentile", "seed")
    return ", ".join(f"{k}={settings[k]}" for k in keys)
