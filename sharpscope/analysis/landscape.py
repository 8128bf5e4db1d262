"""Loss-landscape slices: 1-D and 2-D slices along directions, and linear interpolation.

Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018: the loss (and accuracy)
of the whole ``data`` (the mean over all its targets: examples, or tokens of a language model; see
:mod:`sharpscope.analysis.objective`) at ``w + x d_1`` (1-D) or ``w + x d_1 + y d_2`` (2-D) over a grid of
coordinates, with filter-normalised Gaussian directions by default (see
:mod:`sharpscope.analysis.directions`); Goodfellow et al., ICLR 2015: the loss along
``(1 - alpha) w_a + alpha w_b``.

Grid orientation: for a 2-D slice ``landscape.loss[i, j]`` is the value at ``x[i]``, ``y[j]``
(dims ``("x", "y")``, the ``numpy.meshgrid(x, y, indexing="ij")`` order); a 1-D slice has dim
``"x"``, an interpolation dim ``"alpha"``.

Cost per grid point: the weights are set with two or three fused multi-tensor kernels
(:func:`~sharpscope.analysis.evaluation.offset_parameters`: copy the base weights, add ``x d_1``,
add ``y d_2``; tensors that are zero in every direction are not touched), then one evaluation pass
over ``data`` (:func:`~sharpscope.analysis.evaluation.full_data_loss`, the user metrics computed on
the same outputs). With ``points_per_call > 1`` several points share one ``torch.func.vmap`` pass
and their values stay on the device until the end of a round of points. Grid points can be
shared among the processes of an initialised ``torch.distributed`` group (``split="points"``: point ``k``
of a round goes to rank ``k % world_size``), or every point split over the ranks' shares of the data
(``split="data"``); either way the values are all-reduced at the end of each round.

BatchNorm policy ``bn``: ``"eval"`` (the default) uses the running statistics stored in the model;
``"recalibrate"`` re-estimates them at every point from ``recalibration_batches`` batches (exact
average over those batches, BatchNorm modules in train mode, everything else in eval mode) —
needed when interpolating between independently trained networks.

A slice is resumable: with ``checkpoint_path`` the partial grid is saved every
``checkpoint_every`` points and a later call with the same model, data, directions, loss function,
metrics and settings continues it, skipping the points already done; a file made with anything
else that changes the values is refused, naming the setting that differs.

Bad input is refused before any point is computed: NaN/inf weights at the origin (naming the
tensors) and a model that cannot run on the data (one cheap forward pass). A non-finite loss at a
far grid point is a legitimate value (the weights overflow there): it is kept, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .. import _validate
from .._progress import progress as _progress
from ..errors import UserInputError
from ..threads import analysis_threads
from .batching import (
    Batch,
    as_batches,
    batch_size,
    batch_weights,
    checked_loss,
    model_device,
    preserved_model_state,
    slice_batch,
    to_device,
)
from .directions import (
    Direction,
    TrajectoryDirections,
    check_direction,
    eigen_directions,
    interpolation_direction,
    random_directions,
    trajectory_directions,
)
from .evaluation import (
    LossAndAccuracy,
    check_finite_parameters,
    check_model_accepts,
    full_data_loss,
    global_norm,
    offset_parameters,
    weighted_loss_sums,
)
from .objective import ClassificationLoss, Objective, TokenCrossEntropy, as_objective
from .parallel import shared_batches
from .results import (
    DatasetResult,
    model_fingerprint,
    provenance,
    read_dataset,
    require_variables,
    tensor_bytes,
)

__all__ = [
    "Direction", "Landscape", "TrajectoryDirections", "eigen_directions", "interpolate", "interpolation_direction",
    "landscape_1d", "landscape_2d", "random_directions", "trajectory_directions",
]

KIND = "landscape"
BN_POLICIES = ("eval", "recalibrate")
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: How a grid uses several ranks: points dealt round-robin, or every point on every rank's share of the data.
SPLITS = ("points", "data")


class Landscape(DatasetResult):
    """Loss, accuracy (and user metrics) over a grid of coordinates, with the settings that made it.

    Attributes:
        dataset: an ``xarray.Dataset`` with one variable per metric over the coordinate dims, and a
            ``done`` variable (1 where the point is computed).
        settings: how it was made (slice kind, normalisation, ``ignore``, seeds, BN policy, data size
            and fingerprint, model fingerprint, direction norms).
    """

    KIND = KIND

    # --- access -----------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.dataset["loss"].dims)

    @property
    def coords(self) -> dict[str, np.ndarray]:
        return {d: self.dataset[d].values for d in self.dims}

    @property
    def metrics(self) -> list[str]:
        return list(self.settings["metrics"])

    @property
    def loss(self) -> np.ndarray:
        return self.dataset["loss"].values

    @property
    def accuracy(self) -> np.ndarray:
        return self.dataset["accuracy"].values

    def __getitem__(self, metric: str) -> np.ndarray:
        if metric not in self.metrics:
            raise KeyError(f"no metric {metric!r}; this landscape has {self.metrics}")
        return self.dataset[metric].values

    @property
    def done(self) -> np.ndarray:
        return self.dataset["done"].values.astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def __repr__(self) -> str:
        shape = " x ".join(f"{d}={n}" for d, n in zip(self.dims, self.loss.shape))
        return f"Landscape({self.settings.get('slice')}, {shape}, {int(self.done.sum())}/{self.done.size} done)"

    # --- conversion and files ---------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """Tidy table: one row per grid point, a column per coordinate and per metric, ``done``."""
        df = self.dataset[self.metrics + ["done"]].to_dataframe().reset_index()
        df["done"] = df["done"].astype(bool)
        return df[list(self.dims) + self.metrics + ["done"]]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Landscape:
        """Read a file written by :meth:`save` (refuses another kind, or one that lacks variables)."""
        ds, settings = read_dataset(path, cls.KIND)
        metrics = settings.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise UserInputError(f"{path} is not a complete landscape file: its settings lack the metric names; "
                                 "compute it again")
        require_variables(ds, [*map(str, metrics), "done"], path, "landscape")
        if not ds["loss"].dims or any(d not in ds.coords for d in ds["loss"].dims):
            raise UserInputError(f"{path} is not a complete landscape file: it lacks the grid coordinates")
        ds["done"] = ds["done"].astype(np.int8)
        return cls(ds, settings)


# --- argument checks ------------------------------------------------------------------------

def _coordinates(value: Any, name: str, default_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        count = _validate.integer(int(value), f"{name} (a number of points, or an array of coordinates)")
        return np.linspace(*default_range, count)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{name} must be a 1-D array of coordinates; got {type(value).__name__}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise UserInputError(f"{name} must be a non-empty 1-D array of coordinates; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserInputError(f"{name} must hold finite coordinates; it has NaN or inf")
    return arr


def _check_bn(bn: str) -> str:
    if bn not in BN_POLICIES:
        raise UserInputError(f"bn must be 'eval' (running statistics) or 'recalibrate'; got {bn!r}")
    return bn


def _check_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise UserInputError("metrics must be a dict name -> fn(outputs, targets) returning a scalar")
    for name, fn in metrics.items():
        if name in ("loss", "accuracy", "done") or not str(name).isidentifier():
            raise UserInputError(f"metric name {name!r} is reserved or not an identifier")
        if not callable(fn):
            raise UserInputError(f"metric {name!r} must be callable fn(outputs, targets)")
    return {str(k): v for k, v in metrics.items()}


@dataclass(frozen=True)
class GridOptions:
    """How a grid is evaluated (the keyword arguments every slice shares; see :func:`landscape_1d`)."""

    bn: str = "eval"
    recalibration_batches: int = 10
    metrics: Mapping[str, Metric] | None = None
    checkpoint_path: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    distributed: bool | None = None
    progress: bool = True
    points_per_call: int = 1
    split: str = "points"

    def checked(self) -> GridOptions:
        """A copy with every option validated (one :class:`UserInputError` line for a bad one)."""
        _check_bn(self.bn)
        ppc = _validate.positive_int(self.points_per_call, "points_per_call")
        if ppc > 1 and self.bn != "eval":
            raise UserInputError("points_per_call > 1 needs bn='eval' (vmap cannot update BatchNorm statistics)")
        every = self.checkpoint_every
        return GridOptions(
            bn=self.bn, recalibration_batches=_validate.positive_int(self.recalibration_batches,
                                                                     "recalibration_batches"),
            metrics=_check_metrics(self.metrics), checkpoint_path=self.checkpoint_path,
            checkpoint_every=None if every is None else _validate.positive_int(every, "checkpoint_every (grid points)"),
            distributed=self.distributed, progress=bool(self.progress), points_per_call=ppc,
            split=_validate.choice(self.split, "split", SPLITS),
        )


def _named_tensors(batch: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a batch in order, each with its dict key path (empty inside tuples and lists)."""
    if isinstance(batch, torch.Tensor):
        yield key, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _named_tensors(v, f"{key}/{k}")
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _named_tensors(v, key)


def _data_fingerprint(batches: Sequence[Batch]) -> str:
    """Digest of every tensor's shape, dtype and bytes (and dict keys), batch by batch.

    An ``(x, y)`` batch hashes exactly as in sharpscope 0.1, so older resume files stay valid.
    """
    digest = hashlib.sha256()
    for batch in batches:
        for key, t in _named_tensors(batch):
            if key:
                digest.update(key.encode())
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(tensor_bytes(t))
    return digest.hexdigest()[:16]


def _dist_info(distributed: bool | None) -> tuple[int, int]:
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not available:
        raise UserInputError("distributed=True needs an initialised torch.distributed process group")
    if available and distributed is not False:
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- what determines the values: the identity of the loss and metric functions ----------------

def _is_plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, tuple) and all(_is_plain(v) for v in value))


def _plain_state(obj: Any) -> dict[str, Any]:
    """Public attributes holding plain values: the hyper-parameters of a loss object."""
    return {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())
            if not k.startswith("_") and k != "training" and _is_plain(v)}


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _code_digest(fn: Any) -> str:
    """A digest of a Python function's bytecode, plain constants, defaults and plain closure values."""
    code = fn.__code__
    cells = []
    for cell in fn.__closure__ or ():
        with contextlib.suppress(ValueError):  # an empty cell
            cells.append(cell.cell_contents)
    plain = [[c for c in code.co_consts if _is_plain(c)], [d for d in fn.__defaults__ or () if _is_plain(d)],
             sorted((k, v) for k, v in (fn.__kwdefaults__ or {}).items() if _is_plain(v)),
             [c for c in cells if _is_plain(c)]]
    return hashlib.sha256(code.co_code + repr(plain).encode()).hexdigest()[:16]


def _objective_identity(objective: Objective) -> str:
    """:func:`callable_identity` of an objective: its class, plain settings and the identity of every
    function it holds; ``ClassificationLoss(fn)`` is ``fn`` itself (the loss of ``(x, y)`` batches it
    always was, so a grid started with ``fn`` resumes with it)."""
    if type(objective) is ClassificationLoss:
        return callable_identity(objective.loss_fn)
    held = sorted((k, callable_identity(v)) for k, v in vars(objective).items() if callable(v))
    return f"{_qualified(type(objective))}{_plain_state(objective)}{held if held else ''}"


def callable_identity(fn: Any) -> str:
    """Text that differs whenever ``fn`` computes something else, and is stable across processes.

    - ``nn.Module`` (e.g. ``CrossEntropyLoss(label_smoothing=0.1)``): class, plain hyper-parameters
      (``label_smoothing``, ``reduction``, ...; ``repr()`` alone omits some), ``repr()`` and a
      fingerprint of its parameters and buffers (class weights);
    - a Python function or lambda: ``module.qualname`` and a digest of its code, plain constants,
      defaults and plain closure values;
    - ``functools.partial``: the function's identity and the bound arguments;
    - a bound method: its function and the plain state of the object; another callable object:
      its class and plain public attributes;
    - an :class:`~sharpscope.analysis.objective.Objective`: its class, plain settings and the
      identities of the functions it holds (``ClassificationLoss(fn)``: that of ``fn``).
    """
    if isinstance(fn, Objective):
        return _objective_identity(fn)
    if isinstance(fn, functools.partial):
        return f"partial({callable_identity(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    if isinstance(fn, nn.Module):
        return f"{_qualified(type(fn))}{_plain_state(fn)} {fn!r} state={model_fingerprint(fn)}"
    if inspect.ismethod(fn):
        return f"{callable_identity(fn.__func__)} of {_qualified(type(fn.__self__))}{_plain_state(fn.__self__)}"
    if inspect.isfunction(fn):
        return f"{_qualified(fn)} code={_code_digest(fn)}"
    if inspect.isbuiltin(fn) or isinstance(fn, type):
        return _qualified(fn)
    return f"{_qualified(type(fn))}{_plain_state(fn)}"


def _loss_name(loss_fn: Any, objective: Objective) -> str:
    """A short name of the loss for the settings: the function's name, or the objective's."""
    if isinstance(loss_fn, str):
        return loss_fn
    if type(objective) is ClassificationLoss:
        fn = objective.loss_fn
        return getattr(fn, "__name__", type(fn).__name__)
    return objective.name


def _grid_settings(model: nn.Module, loss_fn: Any, objective: Objective, batches: Sequence[Batch],
                   settings: Mapping[str, Any], options: GridOptions) -> dict[str, Any]:
    """The slice's settings plus everything else that determines its values (checked on resume)."""
    metrics = dict(options.metrics or {})
    out = dict(settings)
    out.update(
        bn=options.bn, recalibration_batches=options.recalibration_batches if options.bn == "recalibrate" else None,
        metrics=["loss", "accuracy", *metrics], n_samples=int(sum(batch_size(b) for b in batches)),
        n_batches=len(batches), data_fingerprint=_data_fingerprint(batches),
        model_fingerprint=model_fingerprint(model),
        model_structure=hashlib.sha256(repr(model).encode()).hexdigest()[:16],
        loss_fn=_loss_name(loss_fn, objective),
        loss_fn_identity=callable_identity(objective),
        metric_functions={name: callable_identity(fn) for name, fn in metrics.items()},
        provenance=provenance(),
    )
    return out


# --- evaluation of points ---------------------------------------------------------------------

def _metric_arguments(objective: Objective, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, targets)`` a user metric gets: ``(model(x), y)`` for a classifier; for a language
    model the logits and the targets they predict (shifted, ``ignore_index`` where nothing is)."""
    if isinstance(objective, TokenCrossEntropy):
        return (out[..., :-1, :] if objective.shift else out), objective.targets(batch)
    return out, objective.targets(batch)  # type: ignore[attr-defined]  # a ClassificationLoss


def _check_metric_objective(objective: Objective, metrics: Mapping[str, Metric]) -> None:
    if metrics and not isinstance(objective, (ClassificationLoss, TokenCrossEntropy)):
        raise UserInputError(f"metrics fn(outputs, targets) need a loss with outputs and targets (classification "
                             f"or 'lm'); the {objective.name} objective has none: drop metrics")


def _add_metrics(total: torch.Tensor, metrics: Mapping[str, Metric], objective: Objective, out: torch.Tensor,
                 batch: Batch, weight: float) -> None:
    """``total[k] += weight * metric_k(outputs, targets)`` (``weight`` = the batch's share of the targets)."""
    if not metrics:
        return
    outputs, targets = _metric_arguments(objective, out, batch)
    for k, fn in enumerate(metrics.values()):
        total[k] += checked_loss(torch.as_tensor(fn(outputs, targets)), "metric").double() * weight


def _has_accuracy(model: nn.Module, objective: Objective, batch: Batch) -> bool:
    """Whether accuracy is defined: the objective counts correct predictions (``objective.correct``);
    for a classifier, class scores ``(N, C)`` against integer labels ``(N,)``."""
    small = to_device(slice_batch(batch, slice(0, 2)), model_device(model))
    with torch.no_grad():
        out = objective.outputs(model, small)
        correct = objective.correct(out, small)
    if isinstance(objective, ClassificationLoss):  # per-example accuracy only (not per pixel of a segmentation)
        return correct is not None and out.dim() == 2
    return correct is not None


class _MetricTap(Objective):
    """The objective handed to :func:`full_data_loss`: ``objective``'s, adding the user metrics of the
    same outputs.

    ``full_data_loss`` calls :meth:`loss` once per batch, so loss, accuracy and metrics come from one pass.
    """

    def __init__(self, objective: Objective, metrics: Mapping[str, Metric], n: float, device: torch.device) -> None:
        self.objective, self.metrics, self.n = objective, metrics, n
        self.name, self.outputs_are_logits = objective.name, objective.outputs_are_logits
        self.total = torch.zeros(len(metrics), dtype=torch.float64, device=device)

    def outputs(self, model: Callable[..., Any], batch: Batch) -> Any:
        return self.objective.outputs(model, batch)

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        _add_metrics(self.total, self.metrics, self.objective, outputs, batch, self.objective.count(batch) / self.n)
        return self.objective.loss(outputs, batch)

    def count(self, batch: Batch) -> int:
        return self.objective.count(batch)

    def correct(self, outputs: Any, batch: Batch) -> torch.Tensor | None:
        return self.objective.correct(outputs, batch)


class _Evaluator:
    """``[loss, accuracy, *metrics]`` of the current weights over all batches (float64, on the device)."""

    def __init__(self, model: nn.Module, objective: Objective, batches: Sequence[Batch], options: GridOptions,
                 classification: bool, data_split: bool = False) -> None:
        self.model, self.objective, self.classification = model, objective, classification
        self.device = model_device(model)
        self.batches = [to_device(b, self.device) for b in batches]
        # split="data": this rank's share with global weights; its partial sums are all-reduced per round
        self.share = shared_batches(self.batches, True, objective) if data_split else None
        self.n = float(sum(objective.count(b) for b in self.batches))  # targets: examples, or tokens
        self.metrics = dict(options.metrics or {})
        self.bn_modules = [m for m in model.modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.recalibrate = options.bn == "recalibrate"
        self.recal = self.batches[:options.recalibration_batches]

    def _recalibrate(self) -> None:
        for m in self.bn_modules:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exact mean of the batch statistics
            m.train()
        with torch.no_grad():
            for batch in self.recal:
                self.objective.outputs(self.model, batch)
        for m in self.bn_modules:
            m.eval()

    def __call__(self) -> torch.Tensor:
        if self.recalibrate:
            self._recalibrate()
        tap = _MetricTap(self.objective, self.metrics, self.n, self.device)
        if self.share is not None:
            sums = weighted_loss_sums(self.model, tap, self.share, with_accuracy=self.classification)
            accuracy = sums[1:] / self.n if self.classification else torch.full_like(sums[1:], math.nan)
            return torch.cat([sums[:1], accuracy, tap.total])
        value = full_data_loss(self.model, tap, self.batches, with_accuracy=self.classification)
        loss, accuracy = (value.loss, value.accuracy) if isinstance(value, LossAndAccuracy) else (value, math.nan)
        head = torch.tensor([loss, accuracy], dtype=torch.float64, device=self.device)
        return torch.cat([head, tap.total])


@contextlib.contextmanager
def _bn_momentum_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    saved = [m.momentum for m in modules]
    try:
        yield
    finally:
        for m, mom in zip(modules, saved):
            m.momentum = mom


class _LinearSetter:
    """Sets ``w = w0 + sum_k c_k d_k`` (:func:`offset_parameters`); tensors zero in every direction are left alone."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction]) -> None:
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        names = [n for n in tensors if any(n in d and bool(d[n].any()) for d in directions)]
        self.names = names
        self.targets = [tensors[n] for n in names]
        self.base = [t.detach().clone() for t in self.targets]
        self.dirs = [[(d[n] if n in d else torch.zeros_like(tensors[n])).to(tensors[n].device, tensors[n].dtype)
                      for n in names] for d in directions]

    def __call__(self, coords: Sequence[float]) -> None:
        if self.targets:
            offset_parameters(self.targets, self.base, self.dirs, coords)


class _LerpSetter:
    """Sets ``w = lerp(w_a, w_b, alpha)``, exact at ``alpha = 0`` and ``alpha = 1``."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, include_buffers: bool) -> None:
        ta = dict(model_a.named_parameters())
        tb = dict(model_b.named_parameters())
        if include_buffers:
            ta.update({n: b for n, b in model_a.named_buffers() if b.is_floating_point()})
            tb.update({n: b for n, b in model_b.named_buffers() if b.is_floating_point()})
        self.targets = list(ta.values())
        self.base = [t.detach().clone() for t in self.targets]
        self.ends = [tb[n].detach().to(t.device, t.dtype) for n, t in ta.items()]

    @torch.no_grad()
    def __call__(self, coords: Sequence[float]) -> None:
        torch._foreach_copy_(self.targets, self.base)
        torch._foreach_lerp_(self.targets, self.ends, float(coords[0]))


class _Sequential:
    """Points one after the other: set the model's weights in place, evaluate."""

    def __init__(self, evaluator: _Evaluator, setter: Callable[[Sequence[float]], None]) -> None:
        self.ev, self.setter = evaluator, setter

    def __call__(self, points: Sequence[Sequence[float]]) -> torch.Tensor:
        rows = []
        for point in points:
            self.setter(point)
            rows.append(self.ev())
        return torch.stack(rows)


class _VmapEvaluator:
    """Evaluates several points of a linear slice in one call: ``torch.func.vmap`` over stacked weights.

    Only the tensors that move are stacked (``points x shape``); the rest of the model is shared.
    This keeps a GPU busy when one point is too small a workload; the model must be
    vmap-compatible (standard layers are) and BatchNorm must use running statistics (``bn="eval"``).
    Each point's values are accumulated as :func:`full_data_loss` does (batch weights ``c_b / C``,
    float64; accuracy as a count divided by ``C`` at the end). The objective's outputs must be tensors
    (classification, ``"lm"``); the loss of each point is computed outside the ``vmap``.
    """

    def __init__(self, evaluator: _Evaluator, setter: _LinearSetter) -> None:
        self.ev, self.setter = evaluator, setter
        moving = set(setter.names)
        self.fixed = {n: t.detach() for n, t in [*evaluator.model.named_parameters(),
                                                 *evaluator.model.named_buffers()] if n not in moving}

    def _stacked(self, coords: Sequence[Sequence[float]]) -> dict[str, torch.Tensor]:
        st = self.setter
        c = torch.tensor(coords, dtype=torch.float64, device=self.ev.device)
        stacked = {}
        for i, name in enumerate(st.names):
            base = st.base[i]
            w = base.unsqueeze(0).repeat(len(coords), *([1] * base.dim()))
            for k, d in enumerate(st.dirs):
                w += c[:, k].to(base.dtype).view(-1, *([1] * base.dim())) * d[i]
            stacked[name] = w
        return stacked

    @torch.no_grad()
    def __call__(self, coords: Sequence[Sequence[float]]) -> torch.Tensor:
        ev = self.ev
        stacked = self._stacked(coords)

        objective = ev.objective

        def forward(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
            def model(*args: Any, **kwargs: Any) -> Any:
                return torch.func.functional_call(ev.model, (params, self.fixed), args, kwargs)

            return objective.outputs(model, batch)

        total = torch.zeros(len(coords), 2 + len(ev.metrics), dtype=torch.float64, device=ev.device)
        weighted = ev.share if ev.share is not None else list(zip(ev.batches, batch_weights(ev.batches, objective)))
        for batch, w in weighted:
            outs = torch.func.vmap(forward, in_dims=(0, None))(stacked, batch)
            for p, out in enumerate(outs):
                total[p, 0] += checked_loss(objective.loss(out, batch)).double() * w
                if ev.classification:
                    total[p, 1] += objective.correct(out, batch)
                _add_metrics(total[p, 2:], ev.metrics, objective, out, batch, w)
        total[:, 1] = total[:, 1] / ev.n if ev.classification else math.nan
        return total


# --- the grid ---------------------------------------------------------------------------------

_RESUME_CHECKS = (
    ("model_fingerprint", "another model (its weights differ)"),
    ("model_structure", "another model architecture"),
    ("data_fingerprint", "other data"),
    ("loss_fn_identity", "another loss function"),
    ("metric_functions", "other metric functions"),
    ("directions_fingerprint", "other directions"),
    ("slice", "another kind of slice"),
    ("bn", "another BatchNorm policy"),
    ("recalibration_batches", "another number of recalibration batches"),
    ("metrics", "other metrics"),
    ("include_buffers", "another include_buffers"),
    ("model_b_fingerprint", "another end model"),
)


def _compatible(prev: Landscape, coords: Mapping[str, np.ndarray], settings: Mapping[str, Any], path: Any) -> None:
    """Refuse a resume file unless everything that determines the values is the same (one line naming it)."""
    for key, why in _RESUME_CHECKS:
        if prev.settings.get(key) != settings.get(key):
            raise UserInputError(f"cannot resume from {path}: it was computed with {why} "
                                 f"({key} {prev.settings.get(key)!r} != {settings.get(key)!r}); "
                                 "delete the file or choose another checkpoint_path")
    if prev.dims != tuple(coords) or any(not np.array_equal(prev.coords[d], c) for d, c in coords.items()):
        raise UserInputError(f"cannot resume from {path}: its grid coordinates differ from the ones asked")


class _GridState:
    """The grid's values and ``done`` flags (flat, row-major), started empty or from a resume file."""

    def __init__(self, coords: Mapping[str, np.ndarray], settings: dict[str, Any], path: Path | None) -> None:
        self.coords, self.settings, self.path = dict(coords), settings, path
        self.metric_names = list(settings["metrics"])
        self.shape = tuple(len(c) for c in coords.values())
        size = int(np.prod(self.shape))
        self.values = np.full((size, len(self.metric_names)), np.nan)
        self.done = np.zeros(size, dtype=bool)
        if path is not None and path.exists():
            prev = Landscape.load(path)
            _compatible(prev, coords, settings, path)
            self.values = np.stack([prev.dataset[m].values.reshape(-1) for m in self.metric_names], axis=1)
            self.done = prev.done.reshape(-1).copy()

    @property
    def size(self) -> int:
        return len(self.done)

    def point(self, index: int) -> list[float]:
        """The coordinates of flat grid point ``index``."""
        return [float(ax[i]) for ax, i in zip(self.coords.values(), np.unravel_index(index, self.shape))]

    def record(self, chunk: np.ndarray, values: np.ndarray, save: bool) -> None:
        """Store one round's values; with ``save``, write the partial grid to the resume file."""
        self.values[chunk] = values
        self.done[chunk] = True
        if save and self.path is not None:
            self.landscape().save(self.path)

    def landscape(self) -> Landscape:
        dims = tuple(self.coords)
        data = {m: (dims, self.values[:, k].reshape(self.shape).copy()) for k, m in enumerate(self.metric_names)}
        data["done"] = (dims, self.done.reshape(self.shape).astype(np.int8))
        coords = {d: np.asarray(c) for d, c in self.coords.items()}
        return Landscape(xr.Dataset(data, coords=coords), self.settings)


def _rounds(todo: np.ndarray, options: GridOptions, total_points: int) -> list[np.ndarray]:
    """The points still to do, in rounds saved (and all-reduced) together: every 5 % by default."""
    if options.checkpoint_path is None:
        per_round = max(len(todo), 1)
    elif options.checkpoint_every is not None:
        per_round = options.checkpoint_every
    else:
        per_round = max(1, math.ceil(total_points / 20))
    return [todo[s:s + per_round] for s in range(0, len(todo), per_round)]


def _evaluate_round(grid: _GridState, chunk: np.ndarray, evaluate: Callable, options: GridOptions,
                    rank: int, world: int, tick: Callable[[], None]) -> np.ndarray:
    """The values of the points of one round, summed over ranks: row ``k`` is computed by rank ``k % world``
    (``split="points"``), or every row by every rank on its share of the data (``split="data"``)."""
    results = torch.zeros(len(chunk), len(grid.metric_names), dtype=torch.float64,
                          device=evaluate.ev.device)
    mine = list(range(len(chunk))) if _data_split(options, world) else list(range(rank, len(chunk), world))
    for start in range(0, len(mine), options.points_per_call):
        ks = mine[start:start + options.points_per_call]
        results[ks] = evaluate([grid.point(chunk[k]) for k in ks])
        for _ in ks:
            tick()
    if world > 1:
        results = _all_reduce(results)
    return results.cpu().numpy()


def _all_reduce(results: torch.Tensor) -> torch.Tensor:
    """Sum the per-rank rows (each row is computed by exactly one rank, zeros elsewhere)."""
    dist = torch.distributed
    on_cpu = dist.get_backend() == "gloo"
    buf = results.cpu() if on_cpu else results
    # a NaN on one rank must survive the sum, so transport it as a flag next to a zeroed value
    nan = torch.isnan(buf)
    payload = torch.cat([torch.where(nan, torch.zeros_like(buf), buf), nan.to(buf.dtype)], dim=1)
    dist.all_reduce(payload)
    width = results.shape[1]
    summed, flags = payload[:, :width], payload[:, width:]
    return torch.where(flags > 0, torch.full_like(summed, math.nan), summed).to(results.device)


def _data_split(options: GridOptions, world: int) -> bool:
    return options.split == "data" and world > 1


def _point_evaluator(model: nn.Module, objective: Objective, batches: Sequence[Batch], options: GridOptions,
                     setter: Callable[[Sequence[float]], None], world: int = 1) -> _Sequential | _VmapEvaluator:
    evaluator = _Evaluator(model, objective, batches, options, _has_accuracy(model, objective, batches[0]),
                           _data_split(options, world))
    if options.points_per_call > 1 and getattr(setter, "names", None):
        return _VmapEvaluator(evaluator, setter)  # type: ignore[arg-type]
    return _Sequential(evaluator, setter)


def _grid_objective(model: nn.Module, loss_fn: Any, options: GridOptions) -> Objective:
    """The objective of the slice, refusing what the grid options cannot use (one line)."""
    if not (callable(loss_fn) or isinstance(loss_fn, str)):
        raise UserInputError("loss_fn must be callable loss_fn(outputs, targets) -> scalar, loss_fn(model, batch), "
                             "a loss name or a sharpscope Objective")
    objective = as_objective(loss_fn, model)
    _check_metric_objective(objective, options.metrics or {})
    if options.points_per_call > 1 and not objective.outputs_are_logits:
        raise UserInputError(f"points_per_call > 1 needs a loss computed from the model's output tensor "
                             f"(classification or 'lm'), not the {objective.name} objective: use points_per_call=1")
    return objective


def _run_grid(model: nn.Module, loss_fn: Any, data: Any, coords: dict[str, np.ndarray],
              make_setter: Callable[[], Callable[[Sequence[float]], None]], settings: dict[str, Any],
              options: GridOptions) -> Landscape:
    """Evaluate every grid point not yet done (resuming, sharing points among ranks, saving rounds)."""
    options = options.checked()
    objective = _grid_objective(model, loss_fn, options)
    batches = as_batches(data)
    check_model_accepts(model, objective, batches[0])
    path = Path(options.checkpoint_path) if options.checkpoint_path is not None else None
    grid = _GridState(coords, _grid_settings(model, loss_fn, objective, batches, settings, options), path)
    rank, world = _dist_info(options.distributed)
    rounds = _rounds(np.flatnonzero(~grid.done), options, grid.size)
    per_rank = (lambda c: c) if _data_split(options, world) else (lambda c: c[rank::world])
    bar = _progress(range(sum(len(per_rank(c)) for c in rounds)), enabled=options.progress and rank == 0,
                    desc=f"{settings['slice']} slice")
    ticks = iter(bar)  # advanced once per point evaluated here
    with preserved_model_state(model, train=False):
        evaluate = _point_evaluator(model, objective, batches, options, make_setter(), world)
        with _bn_momentum_kept(evaluate.ev.bn_modules):
            for chunk in rounds:
                values = _evaluate_round(grid, chunk, evaluate, options, rank, world, lambda: next(ticks, None))
                grid.record(chunk, values, save=rank == 0)
    if hasattr(bar, "close"):
        bar.close()
    result = grid.landscape()
    _warn_non_finite(result, stacklevel=4)
    return result


def _warn_non_finite(result: Landscape, stacklevel: int) -> None:
    bad = int((~np.isfinite(result.loss[result.done])).sum())
    if bad:
        warnings.warn(f"{bad} of {result.done.size} grid points gave a non-finite loss; they are kept as NaN/inf "
                      "in the result (the weights there overflow: shrink the coordinate range)",
                      RuntimeWarning, stacklevel=stacklevel)


def _prepare_directions(model: nn.Module, directions: Sequence[Mapping[str, torch.Tensor]] | None, n: int,
                        normalization: str, ignore: str, seed: int) -> list[Direction]:
    if directions is None:
        return random_directions(model, n=n, normalization=normalization, ignore=ignore, seed=seed)
    if isinstance(directions, Mapping):
        directions = [directions]
    directions = list(directions)
    if len(directions) != n:
        raise UserInputError(f"a {n}-D slice needs {n} direction(s); got {len(directions)}")
    out = []
    for k, d in enumerate(directions):
        check_direction(d, model, what=f"direction {k}")
        out.append(d if isinstance(d, Direction) else Direction(d, {"kind": "custom"}))
    return out


def _direction_settings(directions: Sequence[Direction], model: nn.Module) -> dict[str, Any]:
    digest = hashlib.sha256("".join(d.fingerprint() for d in directions).encode()).hexdigest()[:16]

    def shared(key: str) -> Any:
        found = {d.meta.get(key, "custom") for d in directions}
        return found.pop() if len(found) == 1 else "mixed"

    return {
        "normalization": shared("normalization"),
        "ignore": shared("ignore"),
        "directions": [{k: v for k, v in d.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
                       for d in directions],
        "direction_norms": [d.norm() for d in directions],
        "weight_norm": global_norm(list(model.parameters())),
        "directions_fingerprint": digest,
    }


@analysis_threads
def landscape_1d(model: nn.Module, loss_fn: Callable, data: Any,
                 direction: Mapping[str, torch.Tensor] | None = None, steps: int | Sequence[float] = 51, *,
                 normalization: str = "filter", ignore: str = "biasbn", seed: int = 0, bn: str = "eval",
                 recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                 checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                 distributed: bool | None = None, progress: bool = True, points_per_call: int = 1,
                 split: str = "points") -> Landscape:
    """Loss and accuracy along ``w + x d`` for every ``x`` in ``steps`` (dim ``"x"``).

    Args:
        model: the network at ``w`` (finite weights); left exactly as found.
        loss_fn: ``loss_fn(outputs, targets)`` (mean-reduced), ``loss_fn(model, batch)``, a name
            (``"lm"``, ``"hf"``) or an :class:`~sharpscope.analysis.objective.Objective`. The loss at a
            point is the mean over all targets of ``data`` (examples, or tokens of a language model);
            accuracy is reported when the objective counts correct predictions (else NaN).
        data: one batch (``(inputs, targets)`` or a dict of tensors) or an iterable of them (all of it
            is evaluated).
        direction: a :class:`Direction` (or mapping name -> tensor); by default one
            ``random_directions(model, 1, normalization, ignore, seed)``.
        steps: the coordinates, or a number of points evenly spaced on ``[-1, 1]``.
        normalization, ignore, seed: of the random direction (unused when ``direction`` is given).
        bn: ``"eval"`` or ``"recalibrate"`` (see the module docstring).
        recalibration_batches: batches of ``data`` used per point by ``bn="recalibrate"``.
        metrics: extra ``name -> fn(outputs, targets)`` scalars, averaged over the targets (a language
            model's metric gets the logits and the targets they predict); not for a ``loss_fn(model,
            batch)`` or a model's own loss, which have no outputs and targets.
        checkpoint_path: save progress here and resume from it if it exists (a file made with
            another model, data, loss function, metrics or settings is refused).
        checkpoint_every: points between saves (default: every 5 % of the grid).
        distributed: use the ranks of ``torch.distributed`` (default: when a process group is initialised).
        split: with several ranks, ``"points"`` deals the grid points round-robin (each rank evaluates
            whole points on all the data); ``"data"`` evaluates every point on every rank over its share
            of the batches (global weights ``c_b / C``, partial sums all-reduced once per round) -- for
            points too large for one rank. The values are the same either way.
        progress: show a progress bar.
        points_per_call: evaluate this many points per forward call with ``torch.func.vmap`` over
            stacked weights (memory grows with it; useful on a GPU when one point leaves it idle;
            needs ``bn="eval"`` and a loss of the model's output tensor: classification or ``"lm"``).
            The default 1 sets the model's weights in place per point.
    """
    x = _coordinates(steps, "steps")
    check_finite_parameters(model)
    dirs = _prepare_directions(model, None if direction is None else [direction], 1, normalization, ignore, seed)
    settings = {"slice": "1d", "seed": int(seed), **_direction_settings(dirs, model)}
    options = GridOptions(bn, recalibration_batches, metrics, checkpoint_path, checkpoint_every, distributed,
                          progress, points_per_call, split)
    return _run_grid(model, loss_fn, data, {"x": x}, lambda: _LinearSetter(model, dirs), settings, options)


@analysis_threads
def landscape_2d(model: nn.Module, loss_fn: Callable, data: Any,
                 directions: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 x: int | Sequence[float] = 21, y: int | Sequence[float] = 21, *,
                 normalization: str = "filter", ignore: str = "biasbn", seed: int = 0, bn: str = "eval",
                 recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                 checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                 distributed: bool | None = None, progress: bool = True, points_per_call: int = 1,
                 split: str = "points") -> Landscape:
    """Loss and accuracy over ``w + x[i] d_1 + y[j] d_2``: ``result.loss[i, j]`` (dims ``("x", "y")``).

    ``x`` and ``y`` are coordinate arrays of any lengths (or numbers of points on ``[-1, 1]``);
    ``directions`` two :class:`Direction` objects, by default
    ``random_directions(model, 2, normalization, ignore, seed)``. The other arguments are those
    of :func:`landscape_1d`.
    """
    xs = _coordinates(x, "x")
    ys = _coordinates(y, "y")
    check_finite_parameters(model)
    dirs = _prepare_directions(model, directions, 2, normalization, ignore, seed)
    settings = {"slice": "2d", "seed": int(seed), **_direction_settings(dirs, model)}
    options = GridOptions(bn, recalibration_batches, metrics, checkpoint_path, checkpoint_every, distributed,
                          progress, points_per_call, split)
    return _run_grid(model, loss_fn, data, {"x": xs, "y": ys}, lambda: _LinearSetter(model, dirs), settings,
                     options)


@analysis_threads
def interpolate(model_a: nn.Module, model_b: nn.Module, loss_fn: Callable, data: Any,
                alphas: int | Sequence[float] = 21, *, include_buffers: bool = True, bn: str = "eval",
                recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                distributed: bool | None = None, progress: bool = True, split: str = "points") -> Landscape:
    """Loss and accuracy along ``(1 - alpha) w_a + alpha w_b`` (dim ``"alpha"``).

    ``alphas`` are the coordinates (values outside ``[0, 1]`` extrapolate), or a number of points on
    ``[0, 1]``. The weights are set with ``torch.lerp``, so ``alpha = 0`` and ``alpha = 1`` are
    exactly ``model_a`` and ``model_b``. ``model_a`` is the one evaluated (and restored);
    ``model_b`` is only read. ``include_buffers`` interpolates the floating buffers (BatchNorm
    running statistics) too; with independently trained networks prefer ``bn="recalibrate"``.
    The other arguments are those of :func:`landscape_1d`.
    """
    a = _coordinates(alphas, "alphas", (0.0, 1.0))
    check_finite_parameters(model_a, "model_a")
    if isinstance(model_b, nn.Module):
        check_finite_parameters(model_b, "model_b")
    line = interpolation_direction(model_a, model_b, include_buffers=include_buffers)
    settings = {
        "slice": "interpolation", "include_buffers": bool(include_buffers),
        "model_b_fingerprint": model_fingerprint(model_b), "distance": line.norm(),
        "directions_fingerprint": line.fingerprint(),
    }
    options = GridOptions(bn, recalibration_batches, metrics, checkpoint_path, checkpoint_every, distributed,
                          progress, split=split)
    return _run_grid(model_a, loss_fn, data, {"alpha": a},
                     lambda: _LerpSetter(model_a, model_b, include_buffers), settings, options)
