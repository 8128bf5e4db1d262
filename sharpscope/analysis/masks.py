r"""What ZSharp's filter keeps, and whether its ascent finds the sharp directions.

ZSharp (J. Yun, arXiv 2505.02369) perturbs each filtered tensor :math:`t` (``ndim > 1``) along
:math:`g_t \odot m_t` with the mask :math:`m_t = |z_t| > Q_p(|z_t|)` of its layer-wise Z-scores.

* :func:`mask_statistics` -- per layer, over the batches of ``data``: how many entries the mask
  keeps, the threshold, the share of the layer's gradient energy kept
  :math:`\|g_t \odot m_t\|^2 / \|g_t\|^2`, the layer's share :math:`\|e_t\|^2 / \|e\|^2` of the
  squared perturbation norm under both readings (``perturb_norm="tensor"``: every filtered tensor
  gets norm :math:`\rho`, so :math:`\|e\| \approx \rho\sqrt K`; ``"global"``: the whole direction has
  norm :math:`\rho`), how stable the mask is from batch to batch (mean Jaccard overlap
  :math:`|m_a \cap m_b| / |m_a \cup m_b|` over all pairs of batches), and how often the fallback
  to SAM fires (empty mask).
* :func:`perturbation_alignment` -- the ascent directions of SAM, ZSharp (both readings) and ASAM
  (and a random direction, for scale) at the same total norm :math:`\rho`, against the top-k
  Hessian eigenvectors :math:`v_i`: :math:`|\cos(e, v_i)|`, the cosine with the top-k subspace
  :math:`\|V^\top e\| / \|e\|`, the same per layer, the directional curvature
  :math:`e^\top H e / \|e\|^2` and the actual loss increase :math:`L(w + e) - L(w)`.
* :func:`load_mask_log` -- the mask statistics logged during training (``masks.csv``) as a tidy table.

Single source of truth: masks and thresholds come from :mod:`sharpscope.optim.zscore` (the
functions ``ZSharp.first_step`` calls), and every ascent direction is computed by the optimizer
itself -- ``first_step`` on scratch copies of the parameters that hold the gradient, never on the
model -- so the numbers are exactly those of a training step on the same gradient.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from ..optim import ASAM, SAM, ZSharp
from ..optim.zscore import check_percentile, is_filtered, zscore_masks
from ..optim.zsharp import MASK_STATS_COLUMNS
from ..threads import analysis_threads
from .batching import Batch, LossFn, as_batches, batch_size, preserved_model_state, trainable_named_parameters
from .directions import TensorMapping, read_tensor_file, write_tensor_file
from .evaluation import check_finite_parameters, check_model_accepts, full_data_loss, global_norm
from .gradients import iter_gradients
from .objective import Objective, as_objective
from .parallel import gather_in_order, main_progress, my_indices, rank_and_world, use_ranks
from .results import (
    DatasetResult,
    Result,
    TableResult,
    model_fingerprint,
    provenance,
    read_dataset,
    require_variables,
)

PERTURB_NORMS = ("tensor", "global")
METHODS = ("sam", "zsharp", "zsharp_global", "asam", "random")
ALIGNMENT_KIND = "perturbation_alignment"
_ALIGNMENT_VARIABLES = ("eigenvalue", "norm", "cosine", "cos_subspace", "directional_curvature", "loss_increase",
                        "layer_cosine", "layer_subspace", "norm_share", "eigvec_share", "method", "rank", "layer")


# --- ascent directions computed by the optimizers themselves ----------------------------------------
def _check_rho(rho: Any) -> float:
    return _validate.positive_number(rho, "rho")


def optimizer_ascent(make_optimizer: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer],
                     names: Sequence[str], grads: Sequence[torch.Tensor],
                     start: Sequence[torch.Tensor] | None = None,
                     ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Run ``first_step`` of a sharpness-aware optimizer on scratch parameters holding ``grads``.

    The scratch parameters start at zero (exact: ``e = (0 + e) - 0``) or at ``start`` (ASAM needs
    the weights). Returns the ascent ``e`` per tensor and the optimizer (for ``mask_stats``).
    """
    origin = [torch.zeros_like(g) for g in grads] if start is None else [s.detach() for s in start]
    scratch = [nn.Parameter(o.clone()) for o in origin]
    for p, g in zip(scratch, grads):
        p.grad = g.detach().clone()
    opt = make_optimizer(list(zip(names, scratch)))
    opt.first_step()
    return [p.detach() - o for p, o in zip(scratch, origin)], opt


def _zsharp(rho: float, percentile: float, perturb_norm: str, threshold_scope: str
            ) -> Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]:
    return lambda named: ZSharp(named, torch.optim.SGD, rho=rho, percentile=percentile, perturb_norm=perturb_norm,
                                threshold_scope=threshold_scope, lr=0.0)


def _filtered_with_grad(named: Sequence[tuple[str, nn.Parameter]], grads: Sequence[torch.Tensor | None]
                        ) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Names and gradients of the tensors with a gradient, and the indices of the filtered ones (raise if none)."""
    names = [n for (n, _), g in zip(named, grads) if g is not None]
    present = [g for g in grads if g is not None]
    filtered = [i for i, g in enumerate(present) if is_filtered(g)]
    if not filtered:
        raise UserInputError("no gradient reaches any parameter tensor with ndim > 1: nothing is filtered")
    return names, present, filtered


# --- the masks themselves --------------------------------------------------------------------------
class ZSharpMasks(Result, TensorMapping):
    """ZSharp's masks on one gradient: a read-only mapping ``parameter name -> bool tensor`` plus settings.

    Reads like the dict :func:`zsharp_masks` returned before (``masks["fc.weight"]``, ``list(masks)``,
    ``dict(masks)``); ``.save(path)`` / ``ZSharpMasks.load(path)`` keep every bit;
    ``.to_dataframe()`` has one row per tensor (``layer, numel, kept, kept_fraction``).
    """

    KIND = "zsharp_masks"

    def __init__(self, masks: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> None:
        self._tensors = {str(n): m.detach() for n, m in masks.items()}
        self.settings = dict(settings)

    def __repr__(self) -> str:
        return f"ZSharpMasks({len(self)} tensors, percentile={self.settings.get('percentile')})"

    def to_dataframe(self) -> pd.DataFrame:
        kept = [int(m.sum()) for m in self._tensors.values()]
        numel = [m.numel() for m in self._tensors.values()]
        return pd.DataFrame({"layer": list(self._tensors), "numel": numel, "kept": kept,
                             "kept_fraction": [k / max(n, 1) for k, n in zip(kept, numel)]})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the masks (bit for bit) and the settings to ``path`` (netCDF), atomically."""
        return write_tensor_file(self._tensors, path, self.KIND, "settings", self.settings, "m")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ZSharpMasks:
        """Read a file written by :meth:`save` (masks on the CPU)."""
        masks, settings = read_tensor_file(path, cls.KIND, "settings", "m")
        return cls(masks, settings)


def _check_scope(threshold_scope: str) -> str:
    return _validate.choice(threshold_scope, "threshold_scope", ("tensor", "global"))


def _checked_model_and_data(model: nn.Module, loss_fn: LossFn, data: Any, params: Any
                            ) -> tuple[Objective, list[tuple[str, nn.Parameter]], list[Batch]]:
    """The objective, the filtered-model parameters and the batches, after the up-front checks (finite
    weights, a model that runs on the data)."""
    named = _named_filtered_model(model, params)
    objective = as_objective(loss_fn, model)
    batches = as_batches(data)
    check_finite_parameters(model)
    check_model_accepts(model, objective, batches[0])
    return objective, named, batches


def _n_samples(batches: Sequence[Batch]) -> int:
    """Number of examples (leading sizes of the batches; sequences for a language model)."""
    return int(sum(batch_size(b) for b in batches))


@analysis_threads
def zsharp_masks(model: nn.Module, loss_fn: LossFn, data: Any, percentile: float = 0.95, *,
                 threshold_scope: str = "tensor", params: Any = None, distributed: bool | None = None) -> ZSharpMasks:
    """The masks ``ZSharp.first_step`` would use on the gradient of the mean loss over ``data``.

    For a single batch this is exactly the mask of a training step on that batch (model in eval
    mode). Returns a :class:`ZSharpMasks` (a mapping ``{parameter name: bool tensor shaped like the
    parameter}``) for every filtered tensor (``ndim > 1``) that has a gradient; the model is left as found.
    ``distributed``: the gradient is summed over the ranks' shares of the batches (``None``: when a process
    group with several ranks is initialised).
    """
    percentile = check_percentile(percentile)
    _check_scope(threshold_scope)
    loss_fn, named, batches = _checked_model_and_data(model, loss_fn, data, params)
    with preserved_model_state(model, train=False):
        grads = next(iter_gradients(model, loss_fn, batches, named, True, False, distributed=use_ranks(distributed)))
    names, present, filtered = _filtered_with_grad(named, grads)
    filters = zscore_masks([present[i] for i in filtered], percentile, threshold_scope)
    settings = {"percentile": percentile, "threshold_scope": threshold_scope,
                "n_samples": _n_samples(batches), "model_fingerprint": model_fingerprint(model),
                "provenance": provenance()}
    return ZSharpMasks({names[i]: f.mask for i, f in zip(filtered, filters)}, settings)


def _named_filtered_model(model: nn.Module, params: Any) -> list[tuple[str, nn.Parameter]]:
    """Trainable ``(name, parameter)`` pairs; raise unless some tensor has ``ndim > 1``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = trainable_named_parameters(model, params)
    if not any(is_filtered(p) for _, p in named):
        raise UserInputError("the model has no trainable parameter tensor with ndim > 1 (conv/linear weights): "
                             "ZSharp filters nothing, so there is no mask to describe")
    return named


def _batch_rows(names: list[str], grads: list[torch.Tensor], filtered: list[int], rho: float,
                percentile: float, threshold_scope: str) -> tuple[pd.DataFrame, list[torch.Tensor]]:
    """One row per filtered tensor for one gradient, and the masks (on the CPU)."""
    filters = zscore_masks([grads[i] for i in filtered], percentile, threshold_scope)
    readings = {}
    for reading in PERTURB_NORMS:
        e, opt = optimizer_ascent(_zsharp(rho, percentile, reading, threshold_scope), names, grads)
        total = global_norm(e)
        stats = opt.mask_stats
        readings[reading] = (stats, np.array([global_norm([e[i]]) ** 2 / total**2 for i in filtered]), total)
    frame = readings["tensor"][0].copy()
    g_sq = np.array([global_norm([grads[i]]) ** 2 for i in filtered])
    kept_sq = np.array([global_norm([grads[i] * f.mask]) ** 2 for i, f in zip(filtered, filters)])
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["energy_kept"] = np.where(g_sq > 0, kept_sq / g_sq, np.nan)
    for reading, (stats, share, total) in readings.items():
        frame[f"perturbation_norm_{reading}"] = stats["perturbation_norm"].to_numpy()
        frame[f"perturbation_share_{reading}"] = share
        frame[f"total_perturbation_norm_{reading}"] = total
    return frame, [f.mask.detach().reshape(-1).cpu() for f in filters]


def _mean_jaccard(masks: list[torch.Tensor]) -> float:
    """Mean ``|a & b| / |a | b|`` over all pairs (two empty masks count as identical, 1)."""
    if len(masks) < 2:
        return float("nan")
    # float32 counts are exact below 2**24 entries and halve the memory of the (batches x entries) matrix
    m = torch.stack(masks).to(torch.float32 if masks[0].numel() < 2**24 else torch.float64)
    inter = (m @ m.T).to(torch.float64)
    sizes = m.sum(dim=1).to(torch.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    i, j = torch.triu_indices(len(masks), len(masks), offset=1)
    return float(jac[i, j].mean())


class MaskStatisticsResult(TableResult):
    """The table of :func:`mask_statistics` (per layer, or per batch and layer) with its settings.

    Reads like the DataFrame it used to be (``res["kept_fraction"]``, ``res.set_index("layer")``,
    ``res.attrs`` = the settings); files are those of sharpscope 0.1's ``save_mask_statistics``.
    """

    KIND = "mask_statistics"

    def __init__(self, table: pd.DataFrame, settings: dict[str, Any]) -> None:
        super().__init__(table, settings)
        self.table.attrs = self.settings

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskStatisticsResult:
        """Read a file written by :meth:`save` (or 0.1's ``save_mask_statistics``); refuses an incomplete one."""
        ds, meta = read_dataset(path, cls.KIND)
        columns = meta.get("_columns")
        if not isinstance(columns, list) or "layer" not in columns:
            raise UserInputError(f"{path} is not a complete mask statistics file: it lacks its column list; "
                                 "compute it again")
        require_variables(ds, [str(c) for c in columns], path, "mask statistics")
        return super().load(path)


def _per_batch_table(model: nn.Module, loss_fn: LossFn, batches: list[Batch], named: list[tuple[str, nn.Parameter]],
                     rho: float, percentile: float, threshold_scope: str, progress: bool, distributed: bool = False,
                     ) -> tuple[pd.DataFrame, dict[str, list[torch.Tensor]]]:
    """One row per (batch, filtered tensor) and every batch's masks (model in eval mode, left as found).

    With ``distributed`` each rank does its own batches; rows and masks are gathered in batch order.
    """
    computed: dict[int, tuple[pd.DataFrame, list[tuple[str, torch.Tensor]]]] | Exception = {}
    mine = my_indices(len(batches), distributed)
    with preserved_model_state(model, train=False):
        grads_iter = iter_gradients(model, loss_fn, batches, named, False, progress, "masks", distributed)
        try:
            for b, grads in zip(mine, grads_iter):
                names, present, filtered = _filtered_with_grad(named, grads)
                frame, batch_masks = _batch_rows(names, present, filtered, rho, percentile, threshold_scope)
                frame.insert(0, "batch", b)
                computed[b] = (frame, [(names[i], mask) for i, mask in zip(filtered, batch_masks)])
        except Exception as exc:  # noqa: BLE001 - raised on every rank by gather_in_order
            if not distributed:
                raise
            computed = exc
    frames: list[pd.DataFrame] = []
    masks: dict[str, list[torch.Tensor]] = {}
    for frame, batch_masks in gather_in_order(computed, len(batches), distributed):
        frames.append(frame)
        for name, mask in batch_masks:
            masks.setdefault(name, []).append(mask)
    table = pd.concat(frames, ignore_index=True)
    dead = sorted(set(table.loc[table["energy_kept"].isna(), "layer"]))
    if dead:
        warnings.warn(f"the gradient of {', '.join(dead)} is exactly zero in some batch: its kept energy share "
                      "is undefined (NaN) there", RuntimeWarning, stacklevel=3)
    return table, masks


def _summary(table: pd.DataFrame, masks: dict[str, list[torch.Tensor]]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Means over batches per layer (and the mask stability), and the mean total perturbation norms."""
    if table["batch"].nunique() < 2:
        warnings.warn("mask stability (mask_jaccard) needs at least two batches: it is NaN", RuntimeWarning,
                      stacklevel=3)
    grouped = table.groupby("layer", sort=False)
    summary = pd.DataFrame({
        "layer": list(grouped.groups),
        "numel": grouped["numel"].first().to_numpy(),
        "n_batches": grouped.size().to_numpy(),
        "kept": grouped["kept"].mean().to_numpy(),
        "kept_fraction": grouped["kept_fraction"].mean().to_numpy(),
        "kept_fraction_std": grouped["kept_fraction"].std(ddof=0).to_numpy(),
        "threshold": grouped["threshold"].mean().to_numpy(),
        "threshold_std": grouped["threshold"].std(ddof=0).to_numpy(),
        "energy_kept": grouped["energy_kept"].mean().to_numpy(),
    })
    for reading in PERTURB_NORMS:
        for what in ("norm", "share"):
            summary[f"perturbation_{what}_{reading}"] = grouped[f"perturbation_{what}_{reading}"].mean().to_numpy()
    summary["mask_jaccard"] = [_mean_jaccard(masks[name]) for name in summary["layer"]]
    summary["fallback_rate"] = grouped["fallback"].mean().to_numpy()
    per_batch_totals = table.drop_duplicates("batch")
    totals = {f"total_perturbation_norm_{r}": float(per_batch_totals[f"total_perturbation_norm_{r}"].mean())
              for r in PERTURB_NORMS}
    return summary, totals


@analysis_threads
def mask_statistics(model: nn.Module, loss_fn: LossFn, data: Any, percentile: float = 0.95, *,
                    rho: float = 0.05, threshold_scope: str = "tensor", per_batch: bool = False,
                    params: Any = None, progress: bool = True, distributed: bool | None = None) -> MaskStatisticsResult:
    """Per-layer statistics of ZSharp's mask on the batches of ``data`` (model in eval mode).

    For each batch the gradient of its mean loss is filtered exactly as ``ZSharp.first_step``
    does (same functions, same settings), on scratch tensors: the model is left as found.

    Args:
        model, loss_fn, data: as everywhere (``data``: one batch or an iterable of batches; the
            model's weights must be finite and it must run on the data, checked up front).
        percentile: ZSharp's percentile, in (0, 1).
        rho: ZSharp's radius (the perturbation norms scale with it; shares do not).
        threshold_scope: ``"tensor"`` (official) or ``"global"``, as in :class:`~sharpscope.optim.ZSharp`.
        per_batch: return one row per (batch, layer) instead of the summary over batches.
        params: restrict to these parameter tensors (ZSharp built on the same subset).
        progress: show a progress bar over batches (on rank 0).
        distributed: split the batches over the ranks of ``torch.distributed`` (``None``: when a process
            group with several ranks is initialised); each batch is done by one rank and the rows and
            masks are gathered in order, so every rank holds the single-process table (same counts).

    Returns:
        A :class:`MaskStatisticsResult` (reads like a DataFrame). With ``per_batch=False``, one row
        per filtered tensor (``ndim > 1``): ``layer, numel, n_batches, kept, kept_fraction,
        kept_fraction_std, threshold, threshold_std, energy_kept, perturbation_norm_tensor,
        perturbation_share_tensor, perturbation_norm_global, perturbation_share_global, mask_jaccard,
        fallback_rate`` (means over batches; ``mask_jaccard`` is NaN for a single batch, with a
        warning); ``settings`` (also ``.attrs``) hold the mean total perturbation norm under each
        reading. With ``per_batch=True``: ``batch`` followed by the columns of ``ZSharp.mask_stats``
        (identical values), then ``energy_kept`` and the ``perturbation_norm_*``/
        ``perturbation_share_*``/``total_perturbation_norm_*`` columns, and with two or more batches
        the layer's ``mask_jaccard`` (the same on every row of the layer).
    """
    percentile = check_percentile(percentile)
    rho = _check_rho(rho)
    _check_scope(threshold_scope)
    loss_fn, named, batches = _checked_model_and_data(model, loss_fn, data, params)
    active = use_ranks(distributed)
    table, masks = _per_batch_table(model, loss_fn, batches, named, rho, percentile, threshold_scope,
                                    main_progress(progress), active)
    settings: dict[str, Any] = {"percentile": percentile, "rho": rho, "threshold_scope": threshold_scope,
                                "n_batches": len(batches), "per_batch": bool(per_batch),
                                "world_size": rank_and_world(active)[1],
                                "model_fingerprint": model_fingerprint(model), "provenance": provenance()}
    if per_batch:
        if table["batch"].nunique() >= 2:  # the layer's mask stability over the batches, on each of its rows
            table["mask_jaccard"] = table["layer"].map({name: _mean_jaccard(m) for name, m in masks.items()})
        return MaskStatisticsResult(table, settings)
    summary, totals = _summary(table, masks)
    return MaskStatisticsResult(summary, {**totals, **settings})


MASK_STATISTICS_KIND = MaskStatisticsResult.KIND


def save_mask_statistics(table: MaskStatisticsResult | pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a :func:`mask_statistics` result (or a DataFrame, its ``attrs`` as settings); ``table.save(path)``."""
    if not isinstance(table, MaskStatisticsResult):
        table = MaskStatisticsResult(table, dict(table.attrs))
    return table.save(path)


def load_mask_statistics(path: str | os.PathLike[str]) -> MaskStatisticsResult:
    """Read a mask statistics file (an alias of :meth:`MaskStatisticsResult.load`)."""
    return MaskStatisticsResult.load(path)


# --- training-time mask logs -------------------------------------------------------------------------
def load_mask_log(path: str | os.PathLike[str], model: Any = None) -> pd.DataFrame:
    """The mask statistics logged during ZSharp training, as a tidy DataFrame (THE reader of ``masks.csv``).

    Args:
        path: the ``masks.csv`` written by ``sharpscope train`` (or the run folder holding it).
        model: optionally the model (or a checkpoint with ``.model``) the log should belong to;
            a log whose layers or sizes do not match is refused (a log from another run).

    Returns:
        One row per (logged step, filtered tensor), sorted by step: ``step``, ``epoch`` (when
        logged), then the columns of ``ZSharp.mask_stats`` (``layer, numel, kept, kept_fraction,
        threshold, grad_norm, perturbation_norm, fallback``).

    A file that is not such a log, or a damaged one (unreadable bytes, a truncated or incomplete
    row, a non-numeric value, negative sizes) is refused with one line naming the problem.
    """
    path = _mask_log_path(path)
    frame = _read_mask_csv(path)
    required = ["step", *MASK_STATS_COLUMNS]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserInputError(f"{path} is not a ZSharp mask log: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(required)})")
    columns = ["step"] + (["epoch"] if "epoch" in frame.columns else []) + list(MASK_STATS_COLUMNS)
    frame = _checked_mask_columns(frame[columns].copy(), path)
    if model is not None:
        _check_log_matches(frame, getattr(model, "model", model), path)
    order = {name: i for i, name in enumerate(dict.fromkeys(frame["layer"]))}
    frame = frame.assign(_order=frame["layer"].map(order)).sort_values(["step", "_order"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def _mask_log_path(path: str | os.PathLike[str]) -> Path:
    from ..train.layout import RunLayout  # imported here: sharpscope.train imports the analyses' callers

    path = Path(path)
    if path.is_dir():
        path = RunLayout(path).masks
    if not path.is_file():
        raise UserInputError(f"mask log not found: {path} (sharpscope train writes {RunLayout.MASKS} in the run "
                             "folder when training with ZSharp and --log-mask-every > 0)")
    return path


def _read_mask_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise UserInputError(f"{path} is not a ZSharp mask log (unreadable as CSV: {exc.__class__.__name__})") from None
    except OSError as exc:
        raise UserInputError(f"cannot read the mask log {path}: {exc.strerror or exc.__class__.__name__}") from None


def _checked_mask_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Types and completeness of every row: numbers where numbers belong, booleans, no holes."""
    numeric = [c for c in frame.columns if c not in ("layer", "fallback")]
    for col in numeric:
        if not (frame.empty or pd.api.types.is_numeric_dtype(frame[col])):
            raise UserInputError(f"{path} is not a ZSharp mask log (or it is damaged): column {col!r} is not numeric")
    holes = frame[["step", "layer", "numel", "kept", "kept_fraction", "fallback"]].isna().any(axis=1).to_numpy()
    if holes.any():
        row = int(np.flatnonzero(holes)[0]) + 2  # + header line, 1-based
        raise UserInputError(f"{path} is damaged: line {row} is incomplete (a truncated write?); "
                             "remove the line or the file")
    counts = frame[["step", "numel", "kept"]].to_numpy(dtype=np.float64)
    if not (np.isfinite(counts).all() and (counts >= 0).all() and (counts == np.round(counts)).all()):
        raise UserInputError(f"{path} is damaged: its step, numel and kept columns must hold whole numbers >= 0")
    frame["layer"] = frame["layer"].astype(str)
    frame["fallback"] = frame["fallback"].map(_as_bool)
    if frame["fallback"].isna().any():
        raise UserInputError(f"{path} is not a ZSharp mask log: column 'fallback' is not boolean")
    frame["fallback"] = frame["fallback"].astype(bool)
    return frame


def _as_bool(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    return {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}.get(text)


def _check_log_matches(frame: pd.DataFrame, model: nn.Module, path: Path) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a checkpoint with .model, got {type(model).__name__}")
    sizes = {n: p.numel() for n, p in model.named_parameters() if is_filtered(p)}
    logged = frame.drop_duplicates("layer").set_index("layer")["numel"]
    unknown = [n for n in logged.index if n not in sizes]
    wrong = [n for n in logged.index if n in sizes and int(logged[n]) != sizes[n]]
    if unknown or wrong:
        detail = (f"layer(s) not in the model: {', '.join(unknown[:3])}" if unknown
                  else f"size mismatch for {', '.join(wrong[:3])}")
        raise UserInputError(f"{path} comes from another run: its mask log does not match this model's filtered "
                             f"tensors ({detail}{', ...' if len(unknown or wrong) > 3 else ''})")


# --- alignment of the ascent directions with the top Hessian eigenvectors ----------------------------
class AlignmentResult(DatasetResult):
    """Ascent directions of several methods against the top-k Hessian eigenvectors.

    Attributes:
        dataset: ``xarray.Dataset`` over dims ``method``, ``rank`` (eigenpair), ``layer``:
            ``cosine[method, rank]`` (``|cos(e, v_i)|``), ``cos_subspace[method]``,
            ``directional_curvature[method]``, ``loss_increase[method]``, ``norm[method]``,
            ``layer_cosine[method, layer, rank]``, ``layer_subspace[method, layer]``,
            ``norm_share[method, layer]`` (``||e_l||^2 / ||e||^2``),
            ``eigvec_share[layer, rank]`` (``||v_{i,l}||^2``), ``eigenvalue[rank]``.
        settings: rho, k, percentile, seed, loss at ``w``, data and model identity.
    """

    KIND = ALIGNMENT_KIND

    @property
    def methods(self) -> list[str]:
        return [str(m) for m in self.dataset["method"].values]

    @property
    def eigenvalues(self) -> np.ndarray:
        return np.asarray(self.dataset["eigenvalue"].values, dtype=np.float64)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per method: ``method, norm, directional_curvature, loss_increase, cos_subspace,
        cos_v1 .. cos_vk`` (the table that answers "does the ascent find the sharp directions")."""
        ds = self.dataset
        frame = pd.DataFrame({"method": self.methods, "norm": ds["norm"].values,
                              "directional_curvature": ds["directional_curvature"].values,
                              "loss_increase": ds["loss_increase"].values,
                              "cos_subspace": ds["cos_subspace"].values})
        for r in range(ds.sizes["rank"]):
            frame[f"cos_v{r + 1}"] = ds["cosine"].values[:, r]
        return frame

    def layer_dataframe(self) -> pd.DataFrame:
        """Tidy per-layer table: ``method, layer, eigenvector (1..k), cosine, cos_subspace,
        norm_share, eigvec_share``. ``cosine`` is NaN where the direction or the eigenvector has no
        component in that layer."""
        ds = self.dataset
        methods, layers, k = self.methods, [str(v) for v in ds["layer"].values], ds.sizes["rank"]
        n_m, n_l = len(methods), len(layers)
        return pd.DataFrame({
            "method": np.repeat(methods, n_l * k),
            "layer": np.tile(np.repeat(layers, k), n_m),
            "eigenvector": np.tile(np.arange(1, k + 1), n_m * n_l),
            "cosine": ds["layer_cosine"].values.reshape(-1),
            "cos_subspace": np.repeat(ds["layer_subspace"].values.reshape(-1), k),
            "norm_share": np.repeat(ds["norm_share"].values.reshape(-1), k),
            "eigvec_share": np.tile(ds["eigvec_share"].values.reshape(-1), n_m),
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AlignmentResult:
        """Read a file written by :meth:`save` (refuses another kind, or one that lacks variables)."""
        ds, settings = read_dataset(path, cls.KIND)
        require_variables(ds, _ALIGNMENT_VARIABLES, path, "perturbation alignment")
        return cls(ds, settings)

    def __repr__(self) -> str:
        return f"AlignmentResult(methods={self.methods}, k={self.dataset.sizes['rank']}, rho={self.settings.get('rho')})"


def _full_loss(model: nn.Module, loss_fn: LossFn, batches: list[Batch], names: list[str],
               values: list[torch.Tensor] | None, distributed: bool = False) -> float:
    """Mean loss over all batches with the named parameters replaced by ``values`` (model untouched)."""
    parameters = None if values is None else dict(zip(names, values))
    total = float(full_data_loss(model, loss_fn, batches, parameters=parameters,  # type: ignore[arg-type]
                                 distributed=distributed))
    if not math.isfinite(total):
        raise FloatingPointError(f"the loss is not finite ({total}); check the model, data and loss_fn")
    return total


def _orthonormal_columns(v: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column span of ``v`` (columns that are numerically 0 dropped)."""
    if v.numel() == 0:
        return v
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    if not bool(s.max() > 0):
        return u[:, :0]
    return u[:, s > s.max() * max(v.shape) * torch.finfo(v.dtype).eps]


def _checked_alignment_model(model: nn.Module, methods: Sequence[str], k: Any
                             ) -> tuple[list[str], int, list[tuple[str, nn.Parameter]]]:
    """The methods, ``k`` and the trainable parameters, validated."""
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise UserInputError(f"methods must be distinct names among {METHODS}, got {methods}")
    k = _validate.positive_int(k, "k (the number of top eigenvectors)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = trainable_named_parameters(model)
    if any(m.startswith("zsharp") for m in methods) and not any(is_filtered(p) for _, p in named):
        raise UserInputError("the model has no trainable parameter tensor with ndim > 1 (conv/linear weights): "
                             "ZSharp filters nothing; drop the zsharp methods")
    return methods, k, named


def _top_eigenvectors(model: nn.Module, loss_fn: LossFn, batches: list[Batch], names: list[str], k: int,
                      eigen: Any, seed: int, tol: float, max_iter: int, progress: bool,
                      distributed: bool = False) -> tuple[Any, torch.Tensor]:
    """The eigen result (computed unless given, then checked against the model) and its top ``k`` vectors."""
    from .hessian import hessian_eigenvalues

    if eigen is None:
        eigen = hessian_eigenvalues(model, loss_fn, batches, k=k, tol=tol, max_iter=max_iter, seed=seed,
                                    progress=progress, distributed=distributed)
    elif getattr(eigen, "eigenvectors", None) is None:
        raise UserInputError("eigen must be an EigenResult computed with eigenvectors=True")
    if list(eigen.param_names) != names:
        raise UserInputError("eigen was computed for other parameters than this model's trainable ones "
                             "(compute it on the same model, with params=None)")
    fingerprint = getattr(eigen, "settings", {}).get("model_fingerprint")
    if fingerprint is not None and fingerprint != model_fingerprint(model):
        raise UserInputError("eigen was computed for other weights (model fingerprints differ): recompute it "
                             "for this model, or leave eigen=None")
    vectors = torch.as_tensor(np.asarray(eigen.eigenvectors, dtype=np.float64))
    if vectors.shape[1] < k:
        raise UserInputError(f"k={k} but eigen holds only {vectors.shape[1]} eigenvector(s)")
    return eigen, vectors[:, :k]


def _method_ascent(method: str, named: list[tuple[str, nn.Parameter]], with_grad: list[int],
                   grads: list[torch.Tensor], rho: float, percentile: float, asam_eta: float) -> list[torch.Tensor]:
    """One method's ascent ``e`` (per tensor with a gradient), computed by its optimizer's ``first_step``."""
    g_names = [named[i][0] for i in with_grad]
    if method == "sam":
        return optimizer_ascent(lambda nm: SAM(nm, torch.optim.SGD, rho=rho, lr=0.0), g_names, grads)[0]
    if method in ("zsharp", "zsharp_global"):
        reading = "tensor" if method == "zsharp" else "global"
        return optimizer_ascent(_zsharp(rho, percentile, reading, "tensor"), g_names, grads)[0]
    # asam: T depends on w, so start at w (in float64, so that (w + e) - w is e to 1e-16)
    w64 = [named[i][1].detach().to(torch.float64) for i in with_grad]
    return optimizer_ascent(lambda nm: ASAM(nm, torch.optim.SGD, rho=rho, eta=asam_eta, lr=0.0),
                            g_names, [g.to(torch.float64) for g in grads], start=w64)[0]


def _unit_directions(named: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor | None], methods: list[str],
                     rho: float, percentile: float, asam_eta: float, seed: int) -> dict[str, torch.Tensor]:
    """Each method's ascent direction, flat in float64 on the CPU (zeros where no gradient), at unit norm."""
    sizes = [p.numel() for _, p in named]
    with_grad = [i for i, g in enumerate(grads) if g is not None]
    g_list = [grads[i] for i in with_grad]
    units: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "random":
            d = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
        else:
            full = [torch.zeros(s, dtype=torch.float64) for s in sizes]
            for i, t in zip(with_grad, _method_ascent(method, named, with_grad, g_list, rho, percentile, asam_eta)):
                full[i] = t.detach().reshape(-1).cpu().to(torch.float64)
            d = torch.cat(full)
        norm = torch.linalg.vector_norm(d)
        if not norm > 0:
            raise FloatingPointError(f"the {method} ascent direction is zero: the gradient vanishes on "
                                     f"{[n for n, _ in named]}")
        units[method] = d / norm
    return units


def _curvature_and_increase(model: nn.Module, loss_fn: LossFn, batches: list[Batch],
                            named: list[tuple[str, nn.Parameter]], units: dict[str, torch.Tensor], rho: float,
                            progress: bool, distributed: bool = False) -> tuple[dict[str, float], dict[str, float], float]:
    """``u^T H u`` (one Hessian-vector product per method), ``L(w + rho u) - L(w)``, and ``L(w)``."""
    from .curvature import HessianOperator  # the Hessian stack is only needed here

    curvature = {}
    with HessianOperator(model, loss_fn, batches, distributed=distributed) as op:
        for method in _progress(list(units), enabled=progress, desc="curvature along e"):
            u = units[method]
            hu = op.matvec(u.to(device=op.device, dtype=op.dtype)).detach().cpu().to(torch.float64)
            curvature[method] = float(u @ hu)
    names, sizes = [n for n, _ in named], [p.numel() for _, p in named]
    base_loss = _full_loss(model, loss_fn, batches, names, None, distributed)
    increase = {}
    for method, u in units.items():
        step = torch.split(rho * u, sizes)
        values = [p.detach() + s.reshape(p.shape).to(device=p.device, dtype=p.dtype) for (_, p), s in zip(named, step)]
        increase[method] = _full_loss(model, loss_fn, batches, names, values, distributed) - base_loss
    return curvature, increase, base_loss


def _layer_alignment(u: torch.Tensor, vectors: torch.Tensor, sizes: list[int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: ``|cos(u_l, v_{i,l})|``, the cosine with the span of the ``v_{i,l}``, and ``||u_l||^2``."""
    k = vectors.shape[1]
    layer_cos = np.full((len(sizes), k), np.nan)
    layer_sub = np.full(len(sizes), np.nan)
    share = np.zeros(len(sizes))
    for li, (u_l, v_l) in enumerate(zip(torch.split(u, sizes), torch.split(vectors, sizes))):
        u_norm = float(torch.linalg.vector_norm(u_l))
        share[li] = u_norm**2
        if u_norm == 0:
            continue
        v_norms = torch.linalg.vector_norm(v_l, dim=0)
        dots = (u_l @ v_l).abs()
        layer_cos[li] = np.where(v_norms.numpy() > 0, (dots / (u_norm * v_norms)).numpy(), np.nan)
        q = _orthonormal_columns(v_l)
        layer_sub[li] = float(torch.linalg.vector_norm(q.T @ u_l)) / u_norm if q.shape[1] else np.nan
    return layer_cos, layer_sub, share


def _alignment_dataset(units: dict[str, torch.Tensor], vectors: torch.Tensor, eigenvalues: np.ndarray,
                       names: list[str], sizes: list[int], rho: float, curvature: dict[str, float],
                       increase: dict[str, float]) -> xr.Dataset:
    """Cosines with the eigenvectors, globally and per layer, with curvature and loss increase per method."""
    methods, k = list(units), vectors.shape[1]
    basis = _orthonormal_columns(vectors)
    per_layer = [_layer_alignment(units[m], vectors, sizes) for m in methods]
    v_blocks = torch.split(vectors, sizes)
    return xr.Dataset(
        {
            "eigenvalue": ("rank", np.asarray(eigenvalues, dtype=np.float64)[:k]),
            "norm": ("method", np.full(len(methods), rho)),
            "cosine": (("method", "rank"), np.array([[abs(float(units[m] @ vectors[:, r])) for r in range(k)]
                                                     for m in methods])),
            "cos_subspace": ("method", np.array([float(torch.linalg.vector_norm(basis.T @ units[m]))
                                                 for m in methods])),
            "directional_curvature": ("method", np.array([curvature[m] for m in methods])),
            "loss_increase": ("method", np.array([increase[m] for m in methods])),
            "layer_cosine": (("method", "layer", "rank"), np.stack([p[0] for p in per_layer])),
            "layer_subspace": (("method", "layer"), np.stack([p[1] for p in per_layer])),
            "norm_share": (("method", "layer"), np.stack([p[2] for p in per_layer])),
            "eigvec_share": (("layer", "rank"), np.stack([(torch.linalg.vector_norm(v_l, dim=0) ** 2).numpy()
                                                         for v_l in v_blocks])),
        },
        coords={"method": methods, "rank": np.arange(1, k + 1), "layer": names},
    )


@analysis_threads
def perturbation_alignment(model: nn.Module, loss_fn: LossFn, data: Any, k: int = 5, rho: float = 0.05, *,
                           methods: Sequence[str] = METHODS, percentile: float = 0.95, asam_eta: float = 0.01,
                           eigen: Any = None, seed: int = 0, tol: float = 1e-3, max_iter: int = 200,
                           progress: bool = True, distributed: bool | None = None) -> AlignmentResult:
    """How well each method's ascent direction lines up with the top-k Hessian eigenvectors.

    The gradient is that of the mean loss over all of ``data`` (the Hessian is too), model in eval
    mode. Each method's ascent ``e`` is computed by its optimizer's ``first_step`` and rescaled to
    norm ``rho``, so all are compared at the same total norm: ``"sam"``; ``"zsharp"`` (the official
    per-tensor reading) and ``"zsharp_global"`` (``perturb_norm="global"``), both with ``percentile``;
    ``"asam"`` (official rule, ``T = |w| + asam_eta`` on tensors named ``weight``); ``"random"``
    (Gaussian, seeded: the cosine a direction gets by chance, about ``1/sqrt(dim)``).

    Args:
        k: number of top eigenvectors (computed with :func:`~sharpscope.analysis.hessian.hessian_eigenvalues`
            unless ``eigen``, an ``EigenResult`` with eigenvectors for this model, is given).
        rho: the common norm of the directions (> 0).
        seed, tol, max_iter: for the eigen-solver (and ``seed`` for the random direction).
        progress: show progress bars (on rank 0).
        distributed: data-parallel over the ranks of ``torch.distributed`` (``None``: when a process group
            with several ranks is initialised): the eigenvectors, the gradient, the curvatures and the
            losses are all summed over the ranks' shares of the batches; every rank holds the result.

    Returns:
        :class:`AlignmentResult`; ``.to_dataframe()`` has one row per method. NaN/inf weights and a
        model that cannot run on the data are refused before any long work.
    """
    rho = _check_rho(rho)
    percentile = check_percentile(percentile)
    methods, k, named = _checked_alignment_model(model, methods, k)
    loss_fn = as_objective(loss_fn, model)
    batches = as_batches(data)
    check_finite_parameters(model)
    check_model_accepts(model, loss_fn, batches[0])
    names, sizes = [n for n, _ in named], [p.numel() for _, p in named]
    active, progress = use_ranks(distributed), main_progress(progress)
    eigen, vectors = _top_eigenvectors(model, loss_fn, batches, names, k, eigen, seed, tol, max_iter, progress,
                                       active)
    with preserved_model_state(model, train=False):
        grads = next(iter_gradients(model, loss_fn, batches, named, True, progress, "full-data gradient", active))
        units = _unit_directions(named, grads, methods, rho, percentile, asam_eta, seed)
        curvature, increase, base_loss = _curvature_and_increase(model, loss_fn, batches, named, units, rho,
                                                                 progress, active)
    settings = {
        "rho": rho, "k": k, "percentile": percentile, "asam_eta": float(asam_eta), "seed": int(seed),
        "base_loss": base_loss, "n_samples": _n_samples(batches),
        "model_fingerprint": model_fingerprint(model), "eigen_converged": bool(getattr(eigen, "converged", True)),
        "eigen_n_hvp": int(getattr(eigen, "n_hvp", 0)), "world_size": rank_and_world(active)[1],
        "provenance": provenance(),
    }
    return AlignmentResult(_alignment_dataset(units, vectors, eigen.eigenvalues, names, sizes, rho, curvature,
                                              increase), settings)
