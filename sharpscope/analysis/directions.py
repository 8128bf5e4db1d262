"""Directions in weight space for loss-landscape slices (Li et al., NeurIPS 2018).

A slice evaluates the loss at ``w + sum_k c_k d_k`` for a few directions ``d_k``. A direction is a
:class:`Direction`: a read-only mapping ``name -> tensor`` with one entry per parameter (and, for
interpolation, optionally per floating-point buffer) of the model, each tensor shaped like the
model's tensor, plus ``meta`` (how it was made: kind, normalisation, ``ignore``, seed).

Normalisation (Li et al. 2018, Sec. 4), for a Gaussian draw ``d ~ N(0, I)`` and weights ``w``:

* ``"filter"``: every output filter ``f`` (index 0 of a tensor: a conv kernel, a row of a Linear
  weight) is rescaled, ``d_f <- d_f / ||d_f|| * ||w_f||``. This removes the scale invariance of
  ReLU networks with BatchNorm, so that slices of different networks are comparable.
* ``"layer"``: the same per tensor, ``d_t <- d_t / ||d_t|| * ||w_t||``.
* ``"model"``: once over all kept tensors, ``d <- d / ||d|| * ||w||``.
* ``"none"``: the raw Gaussian draw.

``ignore="biasbn"`` (the default, as in Li et al.) sets every tensor with ``ndim <= 1`` (biases,
BatchNorm/LayerNorm scales and shifts) to exactly zero; ``ignore="none"`` keeps them, and a 1-D
tensor then counts as a single filter under ``"filter"`` normalisation (Li et al.'s code instead
copies the weights into the direction there, which makes the slice depend on the sign of the
weights; we do not).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .. import _validate
from ..errors import UserInputError
from ..threads import analysis_threads
from .batching import as_batches
from .evaluation import check_finite_parameters, check_model_accepts, global_norm
from .results import Result, provenance, read_dataset, require_variables, tensor_bytes, write_dataset

NORMALIZATIONS = ("filter", "layer", "model", "none")
IGNORES = ("biasbn", "none")
_EPS = 1e-10


class TensorMapping(Mapping[str, torch.Tensor]):
    """A read-only mapping ``name -> tensor`` over ``self._tensors`` (shared by directions and masks)."""

    _tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class Direction(Result, TensorMapping):
    """A direction in weight space: an ordered mapping ``name -> tensor`` plus ``meta``.

    Names are those of ``model.named_parameters()`` (and of floating buffers for interpolation
    directions that include them). The tensors are detached; treat them as read-only.
    A direction is a result like any other: ``.save(path)`` / ``Direction.load(path)`` keep names,
    shapes, dtypes and every bit of the values; ``meta`` (how it was made, with
    ``meta["provenance"]``) is its ``settings``.
    """

    KIND = "direction"

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        if not tensors:
            raise UserInputError("a Direction needs at least one tensor")
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise UserInputError(f"direction entry {name!r} must be a tensor, got {type(t).__name__}")
            self._tensors[str(name)] = t.detach()
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("provenance", provenance())

    @property
    def settings(self) -> dict[str, Any]:  # type: ignore[override]
        """How the direction was made (the same dict as ``meta``)."""
        return self.meta

    def __repr__(self) -> str:
        kind = self.meta.get("kind", "custom")
        return f"Direction({kind}, {len(self)} tensors, {self.numel()} elements, norm={self.norm():.4g})"

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def flatten(self) -> torch.Tensor:
        """All entries concatenated in name order (float64, CPU)."""
        return torch.cat([t.detach().reshape(-1).double().cpu() for t in self._tensors.values()])

    def norm(self) -> float:
        """Euclidean norm over all entries."""
        return global_norm(list(self._tensors.values()))

    def dot(self, other: Mapping[str, torch.Tensor]) -> float:
        """Inner product with another direction over the names they share."""
        return float(sum((t.double() * other[n].to(t.device).double()).sum()
                         for n, t in self._tensors.items() if n in other))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Direction:
        return Direction({n: t.to(device=device, dtype=dtype) for n, t in self._tensors.items()}, self.meta)

    def fingerprint(self) -> str:
        """A short SHA-256 of names, shapes and values: identifies the direction in result files."""
        digest = hashlib.sha256()
        for name, t in self._tensors.items():
            digest.update(name.encode())
            digest.update(str(tuple(t.shape)).encode())
            digest.update(tensor_bytes(t))
        return digest.hexdigest()[:16]

    # --- the result protocol ---------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """One row per tensor: ``name, shape, numel, dtype, norm``."""
        return pd.DataFrame({
            "name": list(self._tensors),
            "shape": [str(tuple(t.shape)) for t in self._tensors.values()],
            "numel": [t.numel() for t in self._tensors.values()],
            "dtype": [str(t.dtype).removeprefix("torch.") for t in self._tensors.values()],
            "norm": [global_norm([t]) for t in self._tensors.values()],
        })

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tensors (bit for bit, on the CPU) and ``meta`` to ``path`` (netCDF), atomically."""
        return write_tensor_file(self._tensors, path, self.KIND, "meta", self.meta, "t")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Direction:
        """Read a file written by :meth:`save` (tensors on the CPU, in their saved dtypes)."""
        tensors, meta = read_tensor_file(path, cls.KIND, "meta", "t")
        return cls(tensors, meta)


# --- lossless tensor storage in a netCDF3 file -------------------------------------------------------
_NATIVE = {torch.float32: np.float32, torch.float64: np.float64, torch.int8: np.int8, torch.int16: np.int16,
           torch.int32: np.int32}


def tensor_variables(tensors: Mapping[str, torch.Tensor], prefix: str
                     ) -> tuple[dict[str, tuple[str, np.ndarray]], list[dict[str, Any]]]:
    """Flat dataset variables ``<prefix><i>`` holding ``tensors`` exactly, and their specs (name, shape, dtype).

    float32/float64/int8/int16/int32 are stored as such (readable by any netCDF tool); ``bool`` as
    int8 0/1; every other dtype (float16, bfloat16, int64, ...) as its raw bytes, so nothing is rounded.
    """
    variables: dict[str, tuple[str, np.ndarray]] = {}
    specs: list[dict[str, Any]] = []
    for i, (name, t) in enumerate(tensors.items()):
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.dtype in _NATIVE:
            values, encoding = flat.numpy(), "native"
        elif flat.dtype == torch.bool:
            values, encoding = flat.to(torch.int8).numpy(), "bool"
        else:
            values, encoding = flat.view(torch.uint8).numpy().view(np.int8), "bytes"
        variables[f"{prefix}{i}"] = (f"{prefix}{i}_n", values)
        specs.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                      "encoding": encoding})
    return variables, specs


def tensors_from_variables(ds: xr.Dataset, specs: Sequence[Mapping[str, Any]], prefix: str,
                           path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors stored by :func:`tensor_variables` (one line naming the damage if the file lacks one)."""
    out: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        var = f"{prefix}{i}"
        try:
            name, shape, encoding = str(spec["name"]), [int(n) for n in spec["shape"]], spec["encoding"]
            dtype = getattr(torch, spec["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserInputError(f"{path} is damaged: the description of tensor {i} is incomplete; "
                                 "write the file again") from None
        if var not in ds.variables:
            raise UserInputError(f"{path} is damaged: it lacks variable {var!r} (tensor {name!r}); "
                                 "write the file again")
        values = np.asarray(ds[var].values)
        if encoding == "native":
            t = torch.from_numpy(values.astype(_NATIVE[dtype], copy=True))
        elif encoding == "bool":
            t = torch.from_numpy(values != 0)
        else:
            t = torch.from_numpy(values.astype(np.int8, copy=True)).view(torch.uint8).view(dtype)
        if t.numel() != math.prod(shape):
            raise UserInputError(f"{path} is damaged: tensor {name!r} has {t.numel()} values, its shape "
                                 f"{tuple(shape)} needs {math.prod(shape)}; write the file again")
        out[name] = t.reshape(shape)
    return out


def write_tensor_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], kind: str,
                      settings_key: str, settings: Mapping[str, Any], prefix: str) -> Path:
    """Write ``tensors`` (bit for bit) and ``settings`` (under ``settings_key``) to ``path``, atomically."""
    variables, specs = tensor_variables(tensors, prefix)
    return write_dataset(xr.Dataset(variables), path, kind, {settings_key: settings, "tensors": specs})


def read_tensor_file(path: str | os.PathLike[str], kind: str, settings_key: str, prefix: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and settings of a file written by :func:`write_tensor_file` (tensors on the CPU)."""
    ds, header = read_dataset(path, kind)
    settings = _header_entry(header, settings_key, dict, path)
    return tensors_from_variables(ds, _header_entry(header, "tensors", list, path), prefix, path), settings


def _header_entry(header: Mapping[str, Any], key: str, kind: type, path: str | os.PathLike[str]) -> Any:
    """``header[key]`` if it is a ``kind``; else one line saying the file is damaged."""
    value = header.get(key) if isinstance(header, Mapping) else None
    if not isinstance(value, kind):
        raise UserInputError(f"{path} is damaged: its header lacks {key!r}; write the file again")
    return value


def _normalize_(d: torch.Tensor, w: torch.Tensor, normalization: str) -> None:
    """Rescale ``d`` in place, per filter (``"filter"``) or per tensor (``"layer"``)."""
    if normalization == "filter" and d.dim() > 1:
        d2 = d.reshape(d.shape[0], -1)
        w2 = w.reshape(w.shape[0], -1).to(d.dtype)
        d2.mul_(w2.norm(dim=1, keepdim=True) / (d2.norm(dim=1, keepdim=True) + _EPS))
    else:  # "layer", or a 1-D tensor under "filter" (one filter)
        d.mul_(w.to(d.dtype).norm() / (d.norm() + _EPS))


def normalize_direction(direction: Mapping[str, torch.Tensor], model: nn.Module,
                        normalization: str = "filter", ignore: str = "biasbn") -> Direction:
    """Return ``direction`` normalised against ``model``'s weights (see the module docstring)."""
    _validate.choice(normalization, "normalization", NORMALIZATIONS)
    _validate.choice(ignore, "ignore", IGNORES)
    params = dict(model.named_parameters())
    check_direction(direction, model)
    check_finite_parameters(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in direction.items():
        d = t.detach().clone()
        if ignore == "biasbn" and d.dim() <= 1:
            d.zero_()
        elif normalization in ("filter", "layer"):
            if name not in params:
                raise UserInputError(f"cannot {normalization}-normalise buffer entry {name!r}; "
                                     "use normalization='model' or 'none'")
            _normalize_(d, params[name].detach(), normalization)
        out[name] = d
    if normalization == "model":
        kept = [n for n, t in direction.items() if not (ignore == "biasbn" and t.dim() <= 1)]
        w_norm = torch.sqrt(sum(params[n].detach().double().pow(2).sum() for n in kept if n in params))
        d_norm = torch.sqrt(sum(out[n].double().pow(2).sum() for n in kept))
        scale = float(w_norm / (d_norm + _EPS))
        for n in kept:
            out[n].mul_(scale)
    meta = dict(getattr(direction, "meta", {}))
    meta.update(normalization=normalization, ignore=ignore)
    return Direction(out, meta)


def random_directions(model: nn.Module, n: int = 2, normalization: str = "filter", ignore: str = "biasbn",
                      seed: int = 0) -> list[Direction]:
    """``n`` Gaussian directions over ``model.named_parameters()``, normalised as Li et al. 2018.

    The draws come from a CPU generator seeded with ``seed`` (so the same seed gives the same
    directions on any device), direction ``k`` after direction ``k - 1``, parameters in
    ``named_parameters()`` order; each tensor is then moved to its parameter's device and dtype.

    Args:
        model: the network whose weights fix names, shapes and the normalisation scale.
        n: number of directions (>= 1).
        normalization: ``"filter"`` (default), ``"layer"``, ``"model"`` or ``"none"``.
        ignore: ``"biasbn"`` (default) zeroes tensors with ``ndim <= 1``; ``"none"`` keeps them.
        seed: seed of the Gaussian draws.
    """
    n = _validate.positive_int(n, "n")
    _validate.choice(normalization, "normalization", NORMALIZATIONS)
    _validate.choice(ignore, "ignore", IGNORES)
    named = list(model.named_parameters())
    if not named:
        raise UserInputError("the model has no parameters to draw directions for")
    gen = torch.Generator().manual_seed(int(seed))
    directions = []
    for k in range(int(n)):
        raw = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
               for name, p in named}
        d = normalize_direction(Direction(raw), model, normalization, ignore)
        d.meta.update(kind="random", seed=int(seed), index=k)
        directions.append(d)
    return directions


@analysis_threads
def eigen_directions(model: nn.Module, loss_fn: Any, data: Any, n: int = 2, normalization: str = "model",
                     ignore: str = "none", seed: int = 0, tol: float = 1e-3, max_iter: int = 100,
                     progress: bool = False, **hessian_kwargs: Any) -> list[Direction]:
    """The top ``n`` Hessian eigenvectors of the loss as directions, scaled like the random ones.

    The eigenvectors come from :func:`sharpscope.analysis.hessian.hessian_eigenvalues` (Lanczos on
    the full-data Hessian of the trainable parameters; ``seed``, ``tol``, ``max_iter`` and any
    ``hessian_kwargs`` are passed on). Each unit eigenvector is then rescaled with
    :func:`normalize_direction`: the default ``normalization="model"`` multiplies it by ``||w||``,
    which keeps it an exact eigenvector and gives coordinates in the same units as a
    filter-normalised random direction (a step of 1 moves by about the weights' norm);
    ``"filter"``/``"layer"`` follow Li et al. exactly but tilt the vector away from the eigenvector.
    Frozen parameters get zero entries. The sign is fixed so that the largest entry is positive.
    ``meta["eigenvalue"]`` holds the eigenvalue (curvature along the unit vector).
    """
    from .hessian import hessian_eigenvalues

    n = _validate.positive_int(n, "n")
    _validate.choice(normalization, "normalization", NORMALIZATIONS)
    _validate.choice(ignore, "ignore", IGNORES)
    check_finite_parameters(model)
    batches = as_batches(data)
    check_model_accepts(model, loss_fn, batches[0])
    eig = hessian_eigenvalues(model, loss_fn, batches, k=int(n), tol=tol, max_iter=max_iter, seed=seed,
                              eigenvectors=True, progress=progress, **hessian_kwargs)
    params = dict(model.named_parameters())
    out = []
    for k in range(int(n)):
        vec = eig.eigenvector_tensors(k)
        flat = eig.eigenvectors[:, k]
        sign = 1.0 if float(flat[np.abs(flat).argmax()]) >= 0 else -1.0
        tensors = {name: (sign * vec[name]).to(p.device, p.dtype) if name in vec else torch.zeros_like(p)
                   for name, p in params.items()}
        d = normalize_direction(Direction(tensors), model, normalization, ignore)
        d.meta.update(kind="hessian_eigenvector", index=k, seed=int(seed),
                      eigenvalue=float(eig.eigenvalues[k]), converged=bool(eig.converged))
        out.append(d)
    return out


def check_direction(direction: Mapping[str, torch.Tensor], model: nn.Module, what: str = "direction") -> None:
    """Raise :class:`UserInputError` unless every entry names a model parameter/buffer of that shape."""
    if not isinstance(direction, Mapping) or not direction:
        raise UserInputError(f"{what} must be a non-empty mapping name -> tensor (a Direction); "
                             f"got {type(direction).__name__}")
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    for name, t in direction.items():
        if name not in tensors:
            raise UserInputError(f"{what} has an entry {name!r} that the model does not have; "
                                 "was it made for another model?")
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise UserInputError(f"{what} entry {name!r} has shape {tuple(t.shape)}, the model's "
                                 f"tensor has {tuple(tensors[name].shape)}")
        if not torch.isfinite(t).all():
            raise UserInputError(f"{what} entry {name!r} holds NaN or inf values")


def _weights(source: Any, include_buffers: bool) -> dict[str, torch.Tensor]:
    if isinstance(getattr(source, "model", None), nn.Module):  # a loaded checkpoint
        source = source.model
    if isinstance(source, nn.Module):
        out = {n: p.detach() for n, p in source.named_parameters()}
        if include_buffers:
            out.update({n: b.detach() for n, b in source.named_buffers() if b.is_floating_point()})
        return out
    if isinstance(source, Mapping):
        return {str(n): t.detach() for n, t in source.items()
                if isinstance(t, torch.Tensor) and t.is_floating_point()}
    raise UserInputError(f"expected an nn.Module, a checkpoint or a state_dict; got {type(source).__name__}")


def interpolation_direction(model_a: nn.Module, model_b: nn.Module, include_buffers: bool = False) -> Direction:
    """The straight line from ``model_a`` to ``model_b``: ``d = w_b - w_a`` (Goodfellow et al. 2015).

    ``w_a + 1 * d`` is ``w_b`` up to rounding; :func:`~sharpscope.analysis.landscape.interpolate`
    uses ``torch.lerp`` instead, which hits both end points exactly. With ``include_buffers`` the
    floating buffers (BatchNorm running statistics) are interpolated too.
    """
    wa = _weights(model_a, include_buffers)
    wb = _weights(model_b, include_buffers)
    _require_finite_weights(wa, "model_a")
    _require_finite_weights(wb, "model_b")
    if set(wa) != set(wb):
        missing = sorted(set(wa) ^ set(wb))[:3]
        raise UserInputError(f"model_a and model_b have different tensors (e.g. {missing}); "
                             "interpolation needs two models of the same architecture")
    out = {}
    for name, ta in wa.items():
        tb = wb[name]
        if ta.shape != tb.shape:
            raise UserInputError(f"tensor {name!r} has shape {tuple(ta.shape)} in model_a and "
                                 f"{tuple(tb.shape)} in model_b")
        out[name] = tb.to(ta.device, ta.dtype) - ta
    return Direction(out, {"kind": "interpolation", "include_buffers": bool(include_buffers),
                           "normalization": "none", "ignore": "none"})


@dataclass
class TrajectoryDirections(Result):
    """PCA of an optimisation path (Li et al. 2018, Sec. 7).

    Attributes:
        directions: the top principal directions, unit norm (``Direction``), as many as asked.
        explained_variance_ratio: share of the path's variance along each direction.
        coordinates: ``(n_checkpoints, n)`` projections ``<w_i - w_origin, d_k>`` (weight-space units);
            the origin checkpoint is at 0. Pass the same model as ``w_origin`` to ``landscape_2d``
            with ``x``/``y`` spanning these coordinates to draw the path on its surface.
        origin: index of the checkpoint used as origin.
        settings: ``n``, ``ignore``, ``origin``, number of checkpoints, ``provenance``.
    """

    KIND = "trajectory_directions"

    directions: list[Direction]
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray
    origin: int
    settings: dict[str, Any] = field(default_factory=lambda: {"provenance": provenance()})

    def to_dataframe(self) -> pd.DataFrame:
        """One row per checkpoint: ``checkpoint, pc1 .. pcn`` (its coordinates along the directions)."""
        df = pd.DataFrame(self.coordinates, columns=[f"pc{k + 1}" for k in range(self.coordinates.shape[1])])
        df.insert(0, "checkpoint", np.arange(len(df)))
        return df

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write directions (bit for bit), variance ratios, coordinates and settings, atomically."""
        data: dict[str, Any] = {
            "explained_variance_ratio": ("pc", np.asarray(self.explained_variance_ratio, dtype=np.float64)),
            "coordinates": (("checkpoint", "pc"), np.asarray(self.coordinates, dtype=np.float64)),
        }
        described = []
        for k, d in enumerate(self.directions):
            variables, specs = tensor_variables(d, f"d{k}_t")
            data.update(variables)
            described.append({"meta": d.meta, "tensors": specs})
        header = {"origin": int(self.origin), "settings": self.settings, "directions": described}
        return write_dataset(xr.Dataset(data), path, self.KIND, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrajectoryDirections:
        """Read a file written by :meth:`save` (direction tensors on the CPU)."""
        ds, header = read_dataset(path, cls.KIND)
        require_variables(ds, ["explained_variance_ratio", "coordinates"], path, "trajectory directions")
        directions = []
        for k, entry in enumerate(_header_entry(header, "directions", list, path)):
            tensors = tensors_from_variables(ds, _header_entry(entry, "tensors", list, path), f"d{k}_t", path)
            directions.append(Direction(tensors, _header_entry(entry, "meta", dict, path)))
        return cls(directions, np.asarray(ds["explained_variance_ratio"].values, dtype=np.float64),
                   np.asarray(ds["coordinates"].values, dtype=np.float64),
                   int(_header_entry(header, "origin", int, path)), _header_entry(header, "settings", dict, path))


def _require_finite_weights(weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN/inf weights up front, naming the tensors (as ``check_finite_parameters`` does for a model)."""
    bad = [name for name, t in weights.items() if not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserInputError(f"{what} has non-finite values (NaN or inf) in {shown}; "
                             "use a checkpoint from before the run diverged")


def _checked_trajectory(checkpoints: Sequence[Any], n: int, origin: int, ignore: str, model: nn.Module | None
                        ) -> tuple[list[dict[str, torch.Tensor]], list[str], list[str], int]:
    """The checkpoints' weights, the names to keep in the directions and in the PCA, and the origin index."""
    _validate.choice(ignore, "ignore", IGNORES)
    n = _validate.positive_int(n, "n")
    if len(checkpoints) < n + 1:
        raise UserInputError(f"trajectory_directions needs at least n + 1 = {n + 1} checkpoints; "
                             f"got {len(checkpoints)}")
    try:
        origin_idx = range(len(checkpoints))[origin]
    except (IndexError, TypeError):
        raise UserInputError(f"origin must index the {len(checkpoints)} checkpoints; got {origin}") from None
    weights = [_weights(c, include_buffers=False) for c in checkpoints]
    names = list(dict(model.named_parameters())) if model is not None else list(weights[0])
    for i, w in enumerate(weights):
        missing = [nm for nm in names if nm not in w]
        if missing:
            raise UserInputError(f"checkpoint {i} lacks tensor {missing[0]!r}; all checkpoints must share "
                                 "the architecture")
        _require_finite_weights({nm: w[nm] for nm in names}, f"checkpoint {i}")
    kept = [nm for nm in names if not (ignore == "biasbn" and weights[0][nm].dim() <= 1)]
    if not kept:
        raise UserInputError("no tensor left after ignore='biasbn'")
    return weights, names, kept, origin_idx


def _principal_axes(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Top ``n`` principal axes of the centred ``rows`` (signed so that the first row has negative
    coordinates: the path moves along ``+d`` towards the origin), the coordinates, the variance ratios."""
    centred = rows - rows.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    total = float((s**2).sum())
    if total == 0.0:
        raise UserInputError("all checkpoints have the same weights: the trajectory has no direction")
    comps = vh[:n]
    coords = rows @ comps.T
    signs = torch.where(coords[0] < 0, 1.0, -1.0).to(comps.dtype)
    signs[coords[0] == 0] = 1.0
    comps = comps * signs[:, None]
    return comps, rows @ comps.T, (s[:n] ** 2 / total).numpy()


def trajectory_directions(checkpoints: Sequence[Any], n: int = 2, origin: int = -1, ignore: str = "none",
                          model: nn.Module | None = None) -> TrajectoryDirections:
    """Principal directions of a series of checkpoints and the path projected onto them.

    Following Li et al. 2018: the rows ``w_i - w_origin`` (``origin`` is the final checkpoint by
    default) are centred and decomposed by SVD; the top ``n`` right singular vectors are the
    directions, ``s_k^2 / sum s^2`` their explained variance ratio, and ``(w_i - w_origin) . d_k``
    the coordinates of checkpoint ``i``.

    Args:
        checkpoints: at least ``n + 1`` models, loaded checkpoints (with ``.model``) or state dicts,
            all of the same architecture (NaN/inf weights are refused, naming the tensors).
        n: number of directions.
        origin: index of the checkpoint at the origin of the slice.
        ignore: ``"biasbn"`` leaves tensors with ``ndim <= 1`` out of the PCA (zero in the directions).
        model: restricts the entries to this model's parameters (useful with state dicts, whose
            buffers would otherwise count); by default a model's parameters, or a state dict's
            floating entries.
    """
    weights, names, kept, origin_idx = _checked_trajectory(checkpoints, n, origin, ignore, model)
    ref = weights[origin_idx]

    def flat(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(w[nm].double().cpu() - ref[nm].double().cpu()).reshape(-1) for nm in kept])

    comps, coords, ratio = _principal_axes(torch.stack([flat(w) for w in weights]), int(n))
    directions = []
    for k in range(int(n)):
        out, offset = {}, 0
        for nm in names:
            t = ref[nm]
            if nm in kept:
                out[nm] = comps[k, offset:offset + t.numel()].reshape(t.shape).to(t.device, t.dtype)
                offset += t.numel()
            else:
                out[nm] = torch.zeros_like(t)
        directions.append(Direction(out, {"kind": "trajectory_pca", "index": k, "normalization": "none",
                                          "ignore": ignore, "origin": origin_idx}))
    settings = {"n": int(n), "ignore": ignore, "origin": origin_idx, "n_checkpoints": len(checkpoints),
                "parameters": names, "provenance": provenance()}
    return TrajectoryDirections(directions, ratio, coords.numpy(), origin_idx, settings)
