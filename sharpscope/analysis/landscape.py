"""Loss-landscape slices: 1-D and 2-D slices along directions, and linear interpolation.

Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018: the loss (and accuracy)
of the whole ``data`` at ``w + x d_1`` (1-D) or ``w + x d_1 + y d_2`` (2-D) over a grid of
coordinates, with filter-normalised Gaussian directions by default (see
:mod:`sharpscope.analysis.directions`); Goodfellow et al., ICLR 2015: the loss along
``(1 - alpha) w_a + alpha w_b``.

Grid orientation: for a 2-D slice ``landscape.loss[i, j]`` is the value at ``x[i]``, ``y[j]``
(dims ``("x", "y")``, the ``numpy.meshgrid(x, y, indexing="ij")`` order); a 1-D slice has dim
``"x"``, an interpolation dim ``"alpha"``.

Cost per grid point: the weights are set with two or three fused multi-tensor kernels
(``torch._foreach_*``: copy the base weights, add ``x d_1``, add ``y d_2``; tensors that are zero in
every direction are not touched), then one evaluation pass over ``data``; metrics stay on the device
until the end of a round of points, so a GPU is not synchronised per point. Grid points can be
shared among the processes of an initialised ``torch.distributed`` group (point ``k`` of a round
goes to rank ``k % world_size``; the values are all-reduced at the end of each round).

BatchNorm policy ``bn``: ``"eval"`` (the default) uses the running statistics stored in the model;
``"recalibrate"`` re-estimates them at every point from ``recalibration_batches`` batches (exact
average over those batches, BatchNorm modules in train mode, everything else in eval mode) —
needed when interpolating between independently trained networks.

A slice is resumable: with ``checkpoint_path`` the partial grid is saved every
``checkpoint_every`` points and a later call with the same model, data, directions and settings
continues it, skipping the points already done.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .._progress import progress as _progress
from ..errors import UserInputError
from .batching import Batch, as_batches, checked_loss, model_device, preserved_model_state, to_device
from .directions import (
    Direction,
    TrajectoryDirections,
    check_direction,
    eigen_directions,
    interpolation_direction,
    random_directions,
    trajectory_directions,
)
from .results import DatasetResult, model_fingerprint, tensor_bytes

__all__ = [
    "Direction", "Landscape", "TrajectoryDirections", "eigen_directions", "interpolate", "interpolation_direction",
    "landscape_1d", "landscape_2d", "random_directions", "trajectory_directions",
]

KIND = "landscape"
BN_POLICIES = ("eval", "recalibrate")
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        result = super().load(path)
        result.dataset["done"] = result.dataset["done"].astype(np.int8)
        return result


# --- argument checks ------------------------------------------------------------------------

def _coordinates(value: Any, name: str, default_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise UserInputError(f"{name} must be a number of points >= 1 or an array of coordinates; got {value}")
        return np.linspace(*default_range, int(value))
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


def _data_fingerprint(batches: Sequence[Batch]) -> str:
    digest = hashlib.sha256()
    for x, y in batches:
        for t in (x, y):
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


# --- evaluation of one point ----------------------------------------------------------------

class _Evaluator:
    """Loss, accuracy and user metrics of the current weights over all batches, kept on the device."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Sequence[Batch], metrics: dict[str, Metric],
                 bn: str, recalibration_batches: int) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.device = model_device(model)
        self.batches = [to_device(b, self.device) for b in batches]
        self.n = float(sum(len(x) for x, _ in self.batches))
        self.metrics = metrics
        self.bn_modules = [m for m in model.modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.recalibrate = bn == "recalibrate"
        self.recal = self.batches[:recalibration_batches]

    def _recalibrate(self) -> None:
        for m in self.bn_modules:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exact mean of the batch statistics
            m.train()
        for x, _ in self.recal:
            self.model(x)
        for m in self.bn_modules:
            m.eval()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        if self.recalibrate:
            self._recalibrate()
        total = torch.zeros(2 + len(self.metrics), dtype=torch.float64, device=self.device)
        for x, y in self.batches:
            self.add(total, self.model(x), y, len(x) / self.n)
        return total

    def add(self, total: torch.Tensor, out: torch.Tensor, y: torch.Tensor, w: float) -> None:
        """Add one batch's loss, accuracy and metrics, ``w`` = its share of the samples, to ``total``."""
        total[0] += checked_loss(self.loss_fn(out, y)).double() * w
        if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            total[1] += (out.argmax(dim=1) == y).double().sum() / self.n
        else:
            total[1] = math.nan
        for k, fn in enumerate(self.metrics.values()):
            total[2 + k] += checked_loss(torch.as_tensor(fn(out, y)), "metric").double() * w


@contextlib.contextmanager
def _bn_momentum_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    saved = [m.momentum for m in modules]
    try:
        yield
    finally:
        for m, mom in zip(modules, saved):
            m.momentum = mom


class _LinearSetter:
    """Sets ``w = w0 + sum_k c_k d_k`` with one fused kernel per term; skips all-zero tensors."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction]) -> None:
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        names = [n for n in tensors if any(n in d and bool(d[n].any()) for d in directions)]
        self.names = names
        self.targets = [tensors[n] for n in names]
        self.base = [t.detach().clone() for t in self.targets]
        self.dirs = [[(d[n] if n in d else torch.zeros_like(tensors[n])).to(tensors[n].device, tensors[n].dtype)
                      for n in names] for d in directions]

    @torch.no_grad()
    def __call__(self, coords: Sequence[float]) -> None:
        if not self.targets:
            return
        torch._foreach_copy_(self.targets, self.base)
        for c, d in zip(coords, self.dirs):
            if c != 0.0:
                torch._foreach_add_(self.targets, d, alpha=float(c))


class _VmapEvaluator:
    """Evaluates several points of a linear slice in one call: ``torch.func.vmap`` over stacked weights.

    Only the tensors that move are stacked (``points x shape``); the rest of the model is shared.
    This keeps a GPU busy when one point is too small a workload; the model must be
    vmap-compatible (standard layers are) and BatchNorm must use running statistics (``bn="eval"``).
    """

    def __init__(self, evaluator: _Evaluator, setter: _LinearSetter) -> None:
        self.ev, self.setter = evaluator, setter
        model = evaluator.model
        moving = set(setter.names)
        self.fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if n not in moving}

    @torch.no_grad()
    def __call__(self, coords: Sequence[Sequence[float]]) -> torch.Tensor:
        ev, st = self.ev, self.setter
        c = torch.tensor(coords, dtype=torch.float64, device=ev.device)
        stacked = {}
        for i, name in enumerate(st.names):
            base = st.base[i]
            w = base.unsqueeze(0).repeat(len(coords), *([1] * base.dim()))
            for k, d in enumerate(st.dirs):
                w += c[:, k].to(base.dtype).view(-1, *([1] * base.dim())) * d[i]
            stacked[name] = w

        def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(ev.model, (params, self.fixed), (x,))

        total = torch.zeros(len(coords), 2 + len(ev.metrics), dtype=torch.float64, device=ev.device)
        for x, y in ev.batches:
            outs = torch.func.vmap(forward, in_dims=(0, None))(stacked, x)
            w = len(x) / ev.n
            for p, out in enumerate(outs):
                ev.add(total[p], out, y, w)
        return total


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


# --- the grid loop --------------------------------------------------------------------------

def _compatible(prev: Landscape, coords: Mapping[str, np.ndarray], settings: Mapping[str, Any], path: Any) -> None:
    checks = [("model_fingerprint", "another model (its weights differ)"),
              ("data_fingerprint", "other data"),
              ("directions_fingerprint", "other directions"),
              ("slice", "another kind of slice"),
              ("bn", "another BatchNorm policy"),
              ("recalibration_batches", "another number of recalibration batches"),
              ("metrics", "other metrics")]
    for key, why in checks:
        if prev.settings.get(key) != settings.get(key):
            raise UserInputError(f"cannot resume from {path}: it was computed for {why} "
                                 f"({key} {prev.settings.get(key)!r} != {settings.get(key)!r}); "
                                 "delete the file or choose another checkpoint_path")
    if prev.dims != tuple(coords) or any(not np.array_equal(prev.coords[d], c) for d, c in coords.items()):
        raise UserInputError(f"cannot resume from {path}: its grid coordinates differ from the ones asked")


def _empty_dataset(coords: Mapping[str, np.ndarray], metric_names: Sequence[str]) -> xr.Dataset:
    shape = tuple(len(c) for c in coords.values())
    dims = tuple(coords)
    data = {m: (dims, np.full(shape, np.nan)) for m in metric_names}
    data["done"] = (dims, np.zeros(shape, dtype=np.int8))
    return xr.Dataset(data, coords=dict(coords))


def _run_grid(model: nn.Module, loss_fn: Callable, data: Any, coords: dict[str, np.ndarray],
              make_setter: Callable[[], Callable[[Sequence[float]], None]], settings: dict[str, Any], *,
              bn: str, recalibration_batches: int, metrics: Mapping[str, Metric] | None,
              checkpoint_path: str | os.PathLike[str] | None, checkpoint_every: int | None,
              distributed: bool | None, progress: bool, points_per_call: int = 1) -> Landscape:
    _check_bn(bn)
    if isinstance(points_per_call, bool) or not isinstance(points_per_call, (int, np.integer)) \
            or points_per_call < 1:
        raise UserInputError(f"points_per_call must be an integer >= 1; got {points_per_call!r}")
    if points_per_call > 1 and bn != "eval":
        raise UserInputError("points_per_call > 1 needs bn='eval' (vmap cannot update BatchNorm statistics)")
    user_metrics = _check_metrics(metrics)
    if isinstance(recalibration_batches, bool) or not isinstance(recalibration_batches, (int, np.integer)) \
            or recalibration_batches < 1:
        raise UserInputError(f"recalibration_batches must be an integer >= 1; got {recalibration_batches!r}")
    if not callable(loss_fn):
        raise UserInputError("loss_fn must be callable loss_fn(outputs, targets) -> scalar")
    batches = as_batches(data)
    metric_names = ["loss", "accuracy", *user_metrics]
    settings = dict(settings)
    settings.update(
        bn=bn, recalibration_batches=int(recalibration_batches) if bn == "recalibrate" else None,
        metrics=metric_names, n_samples=int(sum(len(x) for x, _ in batches)), n_batches=len(batches),
        data_fingerprint=_data_fingerprint(batches), model_fingerprint=model_fingerprint(model),
        loss_fn=getattr(loss_fn, "__name__", type(loss_fn).__name__),
    )
    ds = _empty_dataset(coords, metric_names)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and path.exists():
        prev = Landscape.load(path)
        _compatible(prev, coords, settings, path)
        ds = prev.dataset
    shape = tuple(len(c) for c in coords.values())
    total_points = int(np.prod(shape))
    values = np.stack([ds[m].values.reshape(-1) for m in metric_names], axis=1)
    done = ds["done"].values.reshape(-1).astype(bool)
    todo = np.flatnonzero(~done)
    rank, world = _dist_info(distributed)
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool)
                                         or not isinstance(checkpoint_every, (int, np.integer))
                                         or checkpoint_every < 1):
        raise UserInputError(f"checkpoint_every must be an integer >= 1 (grid points); got {checkpoint_every!r}")
    if path is None:
        per_round = max(len(todo), 1)
    else:
        per_round = int(checkpoint_every) if checkpoint_every is not None else max(1, math.ceil(total_points / 20))
    rounds = [todo[s:s + per_round] for s in range(0, len(todo), per_round)]
    axes = list(coords.values())

    with preserved_model_state(model, train=False):
        evaluator = _Evaluator(model, loss_fn, batches, user_metrics, bn, int(recalibration_batches))
        setter = make_setter()
        batched = _VmapEvaluator(evaluator, setter) if points_per_call > 1 and getattr(setter, "names", None) \
            else None
        bar = _progress(range(sum(len(c[rank::world]) for c in rounds)), enabled=progress and rank == 0,
                        desc=f"{settings['slice']} slice")
        ticks = iter(bar)  # advanced once per point evaluated here
        with _bn_momentum_kept(evaluator.bn_modules):
            for chunk in rounds:
                # row k of a round is computed by rank k % world; the others leave it at zero
                results = torch.zeros(len(chunk), len(metric_names), dtype=torch.float64, device=evaluator.device)
                mine = list(range(rank, len(chunk), world))
                for start in range(0, len(mine), points_per_call):
                    ks = mine[start:start + points_per_call]
                    points = [[float(ax[i]) for ax, i in zip(axes, np.unravel_index(chunk[k], shape))] for k in ks]
                    if batched is None:
                        setter(points[0])
                        results[ks[0]] = evaluator()
                    else:
                        results[ks] = batched(points)
                    for _ in ks:
                        next(ticks, None)
                if world > 1:
                    results = _all_reduce(results)
                values[chunk] = results.cpu().numpy()
                done[chunk] = True
                if path is not None and rank == 0:
                    _build(coords, metric_names, values, done, shape, settings).save(path)
        if hasattr(bar, "close"):
            bar.close()
    result = _build(coords, metric_names, values, done, shape, settings)
    bad = int((~np.isfinite(result.loss[result.done])).sum())
    if bad:
        warnings.warn(f"{bad} of {total_points} grid points gave a non-finite loss; they are kept as NaN/inf "
                      "in the result (the weights there overflow: shrink the coordinate range)",
                      RuntimeWarning, stacklevel=3)
    return result


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


def _build(coords: Mapping[str, np.ndarray], metric_names: Sequence[str], values: np.ndarray, done: np.ndarray,
           shape: tuple[int, ...], settings: Mapping[str, Any]) -> Landscape:
    dims = tuple(coords)
    data = {m: (dims, values[:, k].reshape(shape).copy()) for k, m in enumerate(metric_names)}
    data["done"] = (dims, done.reshape(shape).astype(np.int8))
    return Landscape(xr.Dataset(data, coords={d: np.asarray(c) for d, c in coords.items()}), settings)


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
    weights = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
    def shared(key: str) -> Any:
        found = {d.meta.get(key, "custom") for d in directions}
        return found.pop() if len(found) == 1 else "mixed"

    return {
        "normalization": shared("normalization"),
        "ignore": shared("ignore"),
        "directions": [{k: v for k, v in d.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
                       for d in directions],
        "direction_norms": [d.norm() for d in directions],
        "weight_norm": float(weights),
        "directions_fingerprint": digest,
    }


def landscape_1d(model: nn.Module, loss_fn: Callable, data: Any,
                 direction: Mapping[str, torch.Tensor] | None = None, steps: int | Sequence[float] = 51, *,
                 normalization: str = "filter", ignore: str = "biasbn", seed: int = 0, bn: str = "eval",
                 recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                 checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                 distributed: bool | None = None, progress: bool = True, points_per_call: int = 1) -> Landscape:
    """Loss and accuracy along ``w + x d`` for every ``x`` in ``steps`` (dim ``"x"``).

    Args:
        model: the network at ``w``; left exactly as found.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        data: one ``(inputs, targets)`` batch or an iterable of them (all of it is evaluated).
        direction: a :class:`Direction` (or mapping name -> tensor); by default one
            ``random_directions(model, 1, normalization, ignore, seed)``.
        steps: the coordinates, or a number of points evenly spaced on ``[-1, 1]``.
        normalization, ignore, seed: of the random direction (unused when ``direction`` is given).
        bn: ``"eval"`` or ``"recalibrate"`` (see the module docstring).
        recalibration_batches: batches of ``data`` used per point by ``bn="recalibrate"``.
        metrics: extra ``name -> fn(outputs, targets)`` scalars, averaged over samples.
        checkpoint_path: save progress here and resume from it if it exists.
        checkpoint_every: points between saves (default: every 5 % of the grid).
        distributed: share the points among the ranks of ``torch.distributed`` (default: when
            a process group is initialised).
        progress: show a progress bar.
        points_per_call: evaluate this many points per forward call with ``torch.func.vmap`` over
            stacked weights (memory grows with it; useful on a GPU when one point leaves it idle;
            needs ``bn="eval"``). The default 1 sets the model's weights in place per point.
    """
    x = _coordinates(steps, "steps")
    dirs = _prepare_directions(model, None if direction is None else [direction], 1, normalization, ignore, seed)
    settings = {"slice": "1d", "seed": int(seed), **_direction_settings(dirs, model)}
    return _run_grid(model, loss_fn, data, {"x": x}, lambda: _LinearSetter(model, dirs), settings,
                     bn=bn, recalibration_batches=recalibration_batches, metrics=metrics,
                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                     distributed=distributed, progress=progress, points_per_call=points_per_call)


def landscape_2d(model: nn.Module, loss_fn: Callable, data: Any,
                 directions: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 x: int | Sequence[float] = 21, y: int | Sequence[float] = 21, *,
                 normalization: str = "filter", ignore: str = "biasbn", seed: int = 0, bn: str = "eval",
                 recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                 checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                 distributed: bool | None = None, progress: bool = True, points_per_call: int = 1) -> Landscape:
    """Loss and accuracy over ``w + x[i] d_1 + y[j] d_2``: ``result.loss[i, j]`` (dims ``("x", "y")``).

    ``x`` and ``y`` are coordinate arrays of any lengths (or numbers of points on ``[-1, 1]``);
    ``directions`` two :class:`Direction` objects, by default
    ``random_directions(model, 2, normalization, ignore, seed)``. The other arguments are those
    of :func:`landscape_1d`.
    """
    xs = _coordinates(x, "x")
    ys = _coordinates(y, "y")
    dirs = _prepare_directions(model, directions, 2, normalization, ignore, seed)
    settings = {"slice": "2d", "seed": int(seed), **_direction_settings(dirs, model)}
    return _run_grid(model, loss_fn, data, {"x": xs, "y": ys}, lambda: _LinearSetter(model, dirs), settings,
                     bn=bn, recalibration_batches=recalibration_batches, metrics=metrics,
                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                     distributed=distributed, progress=progress, points_per_call=points_per_call)


def interpolate(model_a: nn.Module, model_b: nn.Module, loss_fn: Callable, data: Any,
                alphas: int | Sequence[float] = 21, *, include_buffers: bool = True, bn: str = "eval",
                recalibration_batches: int = 10, metrics: Mapping[str, Metric] | None = None,
                checkpoint_path: str | os.PathLike[str] | None = None, checkpoint_every: int | None = None,
                distributed: bool | None = None, progress: bool = True) -> Landscape:
    """Loss and accuracy along ``(1 - alpha) w_a + alpha w_b`` (dim ``"alpha"``).

    ``alphas`` are the coordinates (values outside ``[0, 1]`` extrapolate), or a number of points on
    ``[0, 1]``. The weights are set with ``torch.lerp``, so ``alpha = 0`` and ``alpha = 1`` are
    exactly ``model_a`` and ``model_b``. ``model_a`` is the one evaluated (and restored);
    ``model_b`` is only read. ``include_buffers`` interpolates the floating buffers (BatchNorm
    running statistics) too; with independently trained networks prefer ``bn="recalibrate"``.
    The other arguments are those of :func:`landscape_1d`.
    """
    a = _coordinates(alphas, "alphas", (0.0, 1.0))
    line = interpolation_direction(model_a, model_b, include_buffers=include_buffers)
    settings = {
        "slice": "interpolation", "include_buffers": bool(include_buffers),
        "model_b_fingerprint": model_fingerprint(model_b), "distance": line.norm(),
        "directions_fingerprint": line.fingerprint(),
    }
    return _run_grid(model_a, loss_fn, data, {"alpha": a},
                     lambda: _LerpSetter(model_a, model_b, include_buffers), settings,
                     bn=bn, recalibration_batches=recalibration_batches, metrics=metrics,
                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                     distributed=distributed, progress=progress)
