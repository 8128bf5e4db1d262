r"""Per-layer distributions of the gradient Z-scores that ZSharp filters.

ZSharp (J. Yun, "Sharpness-Aware Minimization with Z-Score Gradient Filtering", arXiv 2505.02369)
standardises the mini-batch gradient of each weight tensor on its own,

.. math::
    z = \frac{g - \mu(g)}{\sigma_{N-1}(g) + 10^{-12}},

and keeps the entries with :math:`|z| > \tau = Q_p(|z|)`. How many entries survive, and how far
the kept ones stand out, depends on the shape of the distribution of :math:`z` in each layer: a
Gaussian layer has :math:`P(|z| > 2) = \operatorname{erfc}(2/\sqrt 2) \approx 4.55\,\%` and excess
kurtosis 0; a heavy-tailed layer has more mass far out. :func:`gradient_zscores` measures, for
every filtered tensor (``ndim > 1``, as ZSharp) or every tensor, per batch and pooled over batches:

* a histogram of :math:`z` on fixed bins (counts outside the bins are kept as ``below``/``above``);
* the moments: mean, standard deviation (N-1), skewness :math:`m_3/m_2^{3/2}` and excess kurtosis
  :math:`m_4/m_2^2 - 3` (central moments :math:`m_k`, the ``scipy.stats`` default ``bias=True``);
* the tail fractions :math:`P(|z| > t)` next to the Gaussian value :math:`\operatorname{erfc}(t/\sqrt2)`;
* the threshold :math:`\tau` at ``percentile`` exactly as ``ZSharp`` computes it
  (:func:`sharpscope.optim.zscore.zscore_mask`), next to the Gaussian value
  :math:`\Phi^{-1}((1 + p)/2)`.

Pooled moments are the moments of all the batches' Z-scores together (exact, from power sums);
the pooled threshold is the mean of the per-batch thresholds (each batch has its own, as in
training). With ``full_data=True`` the gradient of the mean loss over all of ``data`` is analysed
instead, as a single "batch".
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.special import erfc, ndtri
from torch import nn

from .. import _validate
from .._progress import progress as _progress
from ..errors import UserInputError
from ..optim.zscore import check_percentile, is_filtered, layer_zscores, zscore_mask
from ..threads import analysis_threads
from .batching import (
    Batch,
    LossFn,
    as_batches,
    batch_size,
    checked_loss,
    model_device,
    preserved_model_state,
    require_finite,
    to_device,
    trainable_named_parameters,
)
from .evaluation import check_finite_parameters, check_model_accepts
from .objective import Objective, as_objective
from .parallel import (
    gather_in_order,
    main_progress,
    my_indices,
    rank_and_world,
    reduce_sum,
    shared_batches,
    use_ranks,
)
from .results import DatasetResult, model_fingerprint, provenance, read_dataset, require_variables

KIND = "gradient_zscores"
INCLUDE = ("filtered", "all")
_ZSCORE_VARIABLES = ("edges", "numel", "counts", "below", "above", "power_sums", "mean", "std", "skewness",
                     "excess_kurtosis", "tail_count", "tail_fraction", "threshold", "gaussian_tail", "layer",
                     "batch", "tail")


def select_parameters(model: nn.Module, include: str = "filtered",
                      params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to analyse: ZSharp's filtered tensors or all trainable ones.

    ``include="filtered"`` keeps the tensors ZSharp filters (``ndim > 1``: conv, linear and
    embedding weights); ``"all"`` every trainable tensor with at least two entries (a Z-score of a
    single number is undefined). Raises ``UserInputError`` when nothing is left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if include not in INCLUDE:
        raise UserInputError(f"include must be one of {INCLUDE}, got {include!r}")
    named = trainable_named_parameters(model, params)
    if include == "filtered":
        chosen = [(n, p) for n, p in named if is_filtered(p)]
        if not chosen:
            raise UserInputError(
                "the model has no trainable parameter tensor with ndim > 1 (conv/linear weights), so "
                "ZSharp filters nothing; use include='all' to look at biases and norm parameters"
            )
    else:
        chosen = [(n, p) for n, p in named if p.numel() > 1]
        if not chosen:
            raise UserInputError("the model has no trainable parameter tensor with more than one entry")
    return chosen


# --- gradients ---------------------------------------------------------------------------------------
def _batch_gradient(model: nn.Module, objective: Objective, batch: Batch,
                    named: Sequence[tuple[str, nn.Parameter]], device: torch.device) -> list[torch.Tensor | None]:
    """The gradient of one batch's mean loss (``None`` for a tensor the loss does not reach), checked finite."""
    with torch.enable_grad():
        loss = checked_loss(objective(model, to_device(batch, device)))
        require_finite(loss.detach().item(), "the loss")
        grads = list(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))
    for (name, _), g in zip(named, grads):
        if g is not None and not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"the gradient of {name} is not finite; check the model, data and loss_fn")
    return [None if g is None else g.detach() for g in grads]


def full_data_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                        named: Sequence[tuple[str, nn.Parameter]], show_progress: bool = True,
                        desc: str = "gradients", distributed: bool = False) -> list[torch.Tensor | None]:
    """``sum_b (c_b / C) grad L_b``: the gradient of the mean loss over all targets (``None``: unused tensor).

    ``c_b`` is batch ``b``'s number of targets as the objective counts them (examples for a classifier,
    target tokens for a language model), so the result is exact whatever the batch sizes or padding.
    With ``distributed`` each rank sums its share of the batches (global weights) and one all-reduce adds
    the shares and a count of the batches in which each tensor got a gradient (so ``None`` is decided
    over all batches, as in one process).
    """
    objective = as_objective(loss_fn, model)
    device = model_device(model)
    share = shared_batches(batches, distributed, objective)
    total = [torch.zeros_like(p) for _, p in named]
    seen = torch.zeros(len(named), dtype=total[0].dtype if total else torch.float64, device=device)
    for batch, weight in _progress(share, enabled=show_progress and len(share) > 1, desc=desc, total=len(share)):
        for i, g in enumerate(_batch_gradient(model, objective, batch, named, device)):
            if g is not None:
                total[i].add_(g, alpha=weight)
                seen[i] += 1
    reduce_sum([*total, seen], distributed)
    return [t if bool(c > 0) else None for t, c in zip(total, seen.cpu())]


def iter_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                   named: Sequence[tuple[str, nn.Parameter]], full_data: bool = False,
                   show_progress: bool = True, desc: str = "gradients", distributed: bool = False,
                   ) -> Iterator[list[torch.Tensor | None]]:
    """Yield the gradient of each batch's mean loss w.r.t. ``named`` (``None`` for an unused tensor).

    The caller holds the model in the state it wants (eval mode, under
    :func:`~sharpscope.analysis.batching.preserved_model_state`); ``.grad`` is not touched
    (``torch.autograd.grad``). ``loss_fn`` is anything
    :func:`~sharpscope.analysis.objective.as_objective` accepts. With ``full_data`` a single list is
    yielded: the mean of the batch gradients weighted by their numbers of targets, i.e. the gradient of
    the mean loss over all targets
    (:func:`full_data_gradients`). With ``distributed`` (an active split, see
    :mod:`sharpscope.analysis.parallel`) only this rank's batches ``my_indices(len(batches))`` are
    yielded, in order; with ``full_data`` the one gradient is summed over ranks.
    """
    if full_data:
        yield full_data_gradients(model, loss_fn, batches, named, show_progress, desc, distributed)
        return
    objective = as_objective(loss_fn, model)
    device = model_device(model)
    mine = my_indices(len(batches), distributed)
    for b in _progress(mine, enabled=show_progress and len(mine) > 1, desc=desc, total=len(mine)):
        yield _batch_gradient(model, objective, batches[b], named, device)


# --- statistics of one tensor ------------------------------------------------------------------------
def bin_edges(bins: int | Sequence[float] = 160, z_range: tuple[float, float] = (-8.0, 8.0)) -> np.ndarray:
    """Histogram edges: ``bins`` equal bins over ``z_range``, or the given increasing edges."""
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        count = _validate.positive_int(int(bins), "bins (a number of histogram bins)")
        lo, hi = (float(v) for v in z_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserInputError(f"z_range must be finite with low < high; got {z_range}")
        return np.linspace(lo, hi, count + 1)
    edges = np.asarray(bins, dtype=np.float64).reshape(-1)
    if edges.size < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        raise UserInputError("bins must be a number of bins or at least two finite, strictly increasing edges")
    return edges


def zscore_statistics(g: torch.Tensor, edges: torch.Tensor, percentile: float,
                      tails: Sequence[float]) -> dict[str, torch.Tensor]:
    """Histogram, power sums, tail counts and ZSharp threshold of one gradient tensor's Z-scores.

    The Z-scores and the threshold come from :mod:`sharpscope.optim.zscore` (what ``ZSharp``
    uses). Bins are ``[e_i, e_{i+1})`` with the last one closed, as ``numpy.histogram``.
    Returns float64/int64 device tensors; nothing is moved to the host.
    """
    z = layer_zscores(g).reshape(-1)
    threshold = zscore_mask(g, percentile).threshold.to(torch.float64)
    z64 = z.to(torch.float64)
    n_bins = edges.numel() - 1
    index = torch.bucketize(z64, edges, right=True) - 1  # bin i holds edges[i] <= z < edges[i+1]
    index = torch.where(z64 == edges[-1], torch.full_like(index, n_bins - 1), index)
    below = (index < 0).sum()
    above = (index >= n_bins).sum()
    inside = index[(index >= 0) & (index < n_bins)]
    counts = torch.bincount(inside, minlength=n_bins)
    mean = z64.mean()
    d = z64 - mean
    d2 = d * d
    abs_z = z64.abs()
    return {
        "counts": counts,
        "below": below,
        "above": above,
        "power_sums": torch.stack([z64.sum(), (z64 * z64).sum(), (z64**3).sum(), (z64**4).sum()]),
        "central": torch.stack([mean, d2.mean(), (d2 * d).mean(), (d2 * d2).mean()]),
        "tail_counts": torch.stack([(abs_z > t).sum() for t in tails]),
        "threshold": threshold,
    }


def _moments(mean: np.ndarray, m2: np.ndarray, m3: np.ndarray, m4: np.ndarray, n: np.ndarray,
             ) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        std = np.sqrt(m2 * n / np.maximum(n - 1, 1))
        skew = np.where(m2 > 0, m3 / np.power(m2, 1.5), np.nan)
        kurt = np.where(m2 > 0, m4 / (m2 * m2) - 3.0, np.nan)
    return {"mean": mean, "std": std, "skewness": skew, "excess_kurtosis": kurt}


def _central_from_power_sums(s: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    """Central moments m2..m4 and the mean from raw power sums ``s[..., k-1] = sum z^k``."""
    r1, r2, r3, r4 = (s[..., k] / n for k in range(4))
    m2 = r2 - r1**2
    m3 = r3 - 3 * r1 * r2 + 2 * r1**3
    m4 = r4 - 4 * r1 * r3 + 6 * r1**2 * r2 - 3 * r1**4
    return r1, np.maximum(m2, 0.0), m3, m4


# --- the result ----------------------------------------------------------------------------------------
class ZScoreResult(DatasetResult):
    """Per-layer distributions of gradient Z-scores, per batch and pooled.

    Attributes:
        dataset: an ``xarray.Dataset`` with dims ``layer``, ``batch``, ``bin`` (and ``edge``,
            ``tail``): ``counts[batch, layer, bin]``, ``below``/``above`` (outside the bins),
            ``numel[layer]``, ``power_sums``, per-batch ``mean``/``std``/``skewness``/
            ``excess_kurtosis``, ``tail_fraction[batch, layer, tail]``, ``threshold[batch, layer]``
            and ``gaussian_tail[tail]``.
        settings: percentile, tails, ``full_data``, batch sizes, model fingerprint.
    """

    KIND = KIND

    # --- access --------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return [str(v) for v in self.dataset["layer"].values]

    @property
    def edges(self) -> np.ndarray:
        return np.asarray(self.dataset["edges"].values, dtype=np.float64)

    @property
    def percentile(self) -> float:
        return float(self.settings["percentile"])

    @property
    def tails(self) -> np.ndarray:
        return np.asarray(self.dataset["tail"].values, dtype=np.float64)

    @property
    def n_batches(self) -> int:
        return int(self.dataset.sizes["batch"])

    def pooled_counts(self) -> np.ndarray:
        """Histogram counts summed over batches, shape ``(layer, bin)``."""
        return self.dataset["counts"].values.sum(axis=0)

    def pooled_moments(self) -> dict[str, np.ndarray]:
        """Mean, std (N-1), skewness, excess kurtosis of all batches' Z-scores together, per layer."""
        n = self.dataset["numel"].values.astype(np.float64) * self.n_batches
        sums = self.dataset["power_sums"].values.sum(axis=0)
        mean, m2, m3, m4 = _central_from_power_sums(sums, n)
        return _moments(mean, m2, m3, m4, n)

    def pooled_tail_fraction(self) -> np.ndarray:
        """``P(|z| > t)`` over all batches, shape ``(layer, tail)``."""
        counts = self.dataset["tail_count"].values.sum(axis=0)
        return counts / (self.dataset["numel"].values[:, None].astype(np.float64) * self.n_batches)

    # --- tidy tables ---------------------------------------------------------------------------------
    def to_dataframe(self, level: str = "pooled") -> pd.DataFrame:
        """One row per layer (``level="pooled"``) or per batch and layer (``"batch"``).

        Columns: ``layer, numel, [batch,] mean, std, skewness, excess_kurtosis, threshold,
        gaussian_threshold``, then ``p_abs_z_gt_<t>`` and ``gaussian_p_abs_z_gt_<t>`` for each tail
        level ``t``. The pooled threshold is the mean of the per-batch thresholds.
        """
        ds = self.dataset
        layers = self.layers
        numel = ds["numel"].values.astype(np.int64)
        gauss_thr = float(ndtri((1.0 + self.percentile) / 2.0))
        tail_names = [_tail_name(t) for t in self.tails]
        if level == "pooled":
            moments = self.pooled_moments()
            frame = pd.DataFrame({"layer": layers, "numel": numel, "n_batches": self.n_batches, **moments,
                                  "threshold": ds["threshold"].values.mean(axis=0),
                                  "gaussian_threshold": gauss_thr})
            tails = self.pooled_tail_fraction()
        elif level == "batch":
            n_b = self.n_batches
            frame = pd.DataFrame({
                "layer": np.tile(layers, n_b), "numel": np.tile(numel, n_b),
                "batch": np.repeat(np.arange(n_b), len(layers)),
                **{k: ds[k].values.reshape(-1) for k in ("mean", "std", "skewness", "excess_kurtosis")},
                "threshold": ds["threshold"].values.reshape(-1), "gaussian_threshold": gauss_thr,
            })
            tails = ds["tail_fraction"].values.reshape(-1, len(tail_names))
        else:
            raise UserInputError(f"level must be 'pooled' or 'batch', got {level!r}")
        gaussian = ds["gaussian_tail"].values
        for i, name in enumerate(tail_names):
            frame[f"p_abs_z_gt_{name}"] = tails[:, i]
            frame[f"gaussian_p_abs_z_gt_{name}"] = gaussian[i]
        return frame

    def histogram_dataframe(self, level: str = "pooled") -> pd.DataFrame:
        """Tidy histogram: ``layer, [batch,] bin_left, bin_right, z, count, density``.

        ``density`` is ``count / (n * width)`` with ``n`` all the layer's Z-scores (those outside the
        bins included), so it is directly comparable with the standard normal density.
        """
        edges = self.edges
        left, right = edges[:-1], edges[1:]
        width = right - left
        numel = self.dataset["numel"].values.astype(np.float64)
        layers = self.layers
        if level == "pooled":
            counts = self.pooled_counts()
            total = numel * self.n_batches
            rows = {"layer": np.repeat(layers, len(left))}
        elif level == "batch":
            counts = self.dataset["counts"].values.reshape(-1, len(left))
            total = np.tile(numel, self.n_batches)
            rows = {"layer": np.tile(np.repeat(layers, len(left)), self.n_batches),
                    "batch": np.repeat(np.arange(self.n_batches), len(layers) * len(left))}
        else:
            raise UserInputError(f"level must be 'pooled' or 'batch', got {level!r}")
        frame = pd.DataFrame({
            **rows,
            "bin_left": np.tile(left, counts.shape[0]), "bin_right": np.tile(right, counts.shape[0]),
            "z": np.tile((left + right) / 2, counts.shape[0]),
            "count": counts.reshape(-1).astype(np.int64),
        })
        frame["density"] = frame["count"].to_numpy() / (np.repeat(total, len(left)) * np.tile(width, counts.shape[0]))
        return frame

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ZScoreResult:
        """Read a file written by :meth:`save` (refuses another kind, or one that lacks variables)."""
        ds, settings = read_dataset(path, cls.KIND)
        require_variables(ds, _ZSCORE_VARIABLES, path, "gradient Z-score")
        if "percentile" not in settings:
            raise UserInputError(f"{path} is not a complete gradient Z-score file: its settings lack the "
                                 "percentile; compute it again")
        return cls(ds, settings)

    def __repr__(self) -> str:
        return (f"ZScoreResult(layers={len(self.layers)}, batches={self.n_batches}, "
                f"percentile={self.percentile}, full_data={self.settings.get('full_data')})")


def _tail_name(t: float) -> str:
    return f"{t:g}".replace(".", "_")


def load_zscores(path: str | os.PathLike[str]) -> ZScoreResult:
    """Read a :class:`ZScoreResult` saved with :meth:`ZScoreResult.save` (an alias of ``ZScoreResult.load``)."""
    return ZScoreResult.load(path)


# --- the analysis -----------------------------------------------------------------------------------
def _checked_levels(percentile: float, tails: Sequence[float], bins: int | Sequence[float],
                    z_range: tuple[float, float]) -> tuple[float, list[float], np.ndarray]:
    """The percentile, the tail levels and the histogram edges, validated."""
    percentile = check_percentile(percentile)
    if isinstance(tails, (str, bytes)) or not isinstance(tails, (Sequence, np.ndarray)) or len(tails) == 0:
        raise UserInputError(f"tails must be positive finite |z| levels, e.g. (2, 3, 4); got {tails!r}")
    levels = [_validate.positive_number(t, f"tails[{i}] (a |z| level)") for i, t in enumerate(tails)]
    return percentile, levels, bin_edges(bins, z_range)


def _batch_statistics(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                      named: Sequence[tuple[str, nn.Parameter]], edges_np: np.ndarray, percentile: float,
                      tails: Sequence[float], full_data: bool, progress: bool, distributed: bool = False,
                      ) -> list[list[dict[str, torch.Tensor] | None]]:
    """:func:`zscore_statistics` of every selected tensor's gradient, per batch (``None``: no gradient).

    With ``distributed`` each rank does its own batches and the statistics (on the CPU) are gathered in
    batch order; the full-data gradient is summed over ranks and every rank computes its statistics.
    """
    n = 1 if full_data else len(batches)
    mine = [0] if full_data else my_indices(n, distributed)
    computed: dict[int, list[dict[str, torch.Tensor] | None]] | Exception = {}
    with preserved_model_state(model, train=False):
        edges = torch.as_tensor(edges_np, dtype=torch.float64, device=model_device(model))
        grads_iter = iter_gradients(model, loss_fn, batches, named, full_data, progress, "Z-scores", distributed)
        try:
            for b, grads in zip(mine, grads_iter):
                stats = [None if g is None else zscore_statistics(g, edges, percentile, tails) for g in grads]
                computed[b] = [None if st is None else {k: v.cpu() for k, v in st.items()} for st in stats]
        except Exception as exc:  # noqa: BLE001 - raised on every rank by gather_in_order
            if not (distributed and not full_data):
                raise
            computed = exc
    return gather_in_order(computed, n, distributed and not full_data)


def _used_tensors(named: Sequence[tuple[str, nn.Parameter]], per_batch: list[list[dict[str, torch.Tensor] | None]]
                  ) -> tuple[list[str], np.ndarray, list[list[dict[str, torch.Tensor]]]]:
    """Names, sizes and statistics of the tensors the loss depends on (the others left out with a warning)."""
    unused = [name for i, (name, _) in enumerate(named) if any(stats[i] is None for stats in per_batch)]
    if unused:
        warnings.warn(f"no gradient reaches {', '.join(unused)} (not used by the loss): left out", RuntimeWarning,
                      stacklevel=3)
    keep = [i for i, (name, _) in enumerate(named) if name not in unused]
    if not keep:
        raise UserInputError("the loss depends on none of the selected parameter tensors: nothing to analyse")
    stats = [[batch_stats[i] for i in keep] for batch_stats in per_batch]
    numel = np.array([named[i][1].numel() for i in keep], dtype=np.int64)
    return [named[i][0] for i in keep], numel, stats  # type: ignore[return-value]


def _zscore_dataset(names: list[str], numel: np.ndarray, stats: list[list[dict[str, torch.Tensor]]],
                    edges_np: np.ndarray, tails: Sequence[float]) -> xr.Dataset:
    """The per-batch statistics as the dataset of a :class:`ZScoreResult` (warns about constant gradients)."""
    def stack(key: str) -> np.ndarray:
        return torch.stack([torch.stack([s[key] for s in row]) for row in stats]).cpu().numpy()

    central = stack("central")
    moments = _moments(central[..., 0], central[..., 1], central[..., 2], central[..., 3], numel[None, :])
    flat = [n for k, n in enumerate(names) if not np.all(np.isfinite(moments["skewness"][:, k]))]
    if flat:
        warnings.warn(f"the gradient of {', '.join(flat)} is constant in some batch: Z-scores are all 0 and "
                      "skewness/kurtosis are undefined (NaN) there", RuntimeWarning, stacklevel=3)
    tail_counts = stack("tail_counts").astype(np.int64)
    return xr.Dataset(
        {
            "edges": ("edge", edges_np),
            "numel": ("layer", numel),
            "counts": (("batch", "layer", "bin"), stack("counts").astype(np.int64)),
            "below": (("batch", "layer"), stack("below").astype(np.int64)),
            "above": (("batch", "layer"), stack("above").astype(np.int64)),
            "power_sums": (("batch", "layer", "power"), stack("power_sums")),
            **{k: (("batch", "layer"), v) for k, v in moments.items()},
            "tail_count": (("batch", "layer", "tail"), tail_counts),
            "tail_fraction": (("batch", "layer", "tail"), tail_counts / numel[None, :, None]),
            "threshold": (("batch", "layer"), stack("threshold")),
            "gaussian_tail": ("tail", erfc(np.asarray(tails) / math.sqrt(2.0))),
        },
        coords={"layer": names, "batch": np.arange(len(stats)), "tail": np.asarray(tails),
                "power": np.arange(1, 5)},
    )


@analysis_threads
def gradient_zscores(model: nn.Module, loss_fn: LossFn, data: Any, bins: int | Sequence[float] = 160,
                     percentile: float = 0.95, full_data: bool = False, *,
                     z_range: tuple[float, float] = (-8.0, 8.0), tails: Sequence[float] = (2.0, 3.0, 4.0),
                     include: str = "filtered", params: Any = None, progress: bool = True,
                     distributed: bool | None = None) -> ZScoreResult:
    """Distributions of the layer-wise gradient Z-scores ZSharp filters, per layer and batch.

    Args:
        model: any ``nn.Module`` with finite weights; run in eval mode and restored exactly afterwards.
        loss_fn: ``loss_fn(outputs, targets)`` (mean-reduced), ``loss_fn(model, batch)``, a name
            (``"lm"``, ``"hf"``) or an :class:`~sharpscope.analysis.objective.Objective`.
        data: one batch (``(inputs, targets)`` or a dict of tensors) or an iterable of them (a DataLoader).
        bins: number of equal histogram bins over ``z_range``, or the bin edges.
        percentile: ZSharp's percentile in (0, 1); the threshold reported is its ``Q_p(|z|)``.
        full_data: analyse the gradient of the mean loss over all of ``data`` (one "batch"; batches
            weighted by their numbers of targets) instead of each batch's gradient.
        z_range: the histogram's range when ``bins`` is a number.
        tails: levels ``t`` of the tail fractions ``P(|z| > t)``.
        include: ``"filtered"`` (tensors with ``ndim > 1``, what ZSharp filters) or ``"all"``.
        params: restrict to these parameter tensors.
        progress: show a progress bar over batches (on rank 0).
        distributed: split the batches over the ranks of ``torch.distributed`` (``None``: when a process
            group with several ranks is initialised). Each batch's statistics are computed by one rank and
            gathered in order (the full-data gradient is summed over ranks), so every rank holds the
            single-process result: the same histograms, counts and thresholds.

    Returns:
        :class:`ZScoreResult` (``.to_dataframe()``, ``.histogram_dataframe()``, ``.save()``).

    The model runs in eval mode (BatchNorm with its running statistics, dropout off), as every
    analysis does, so a batch's Z-scores are those of a training step on it only for a model
    without BatchNorm or dropout. The analysis is deterministic (no random choice). A tensor the
    loss does not depend on has no distribution and is left out with a warning; a tensor whose
    gradient is constant has Z-scores all 0, and its skewness and kurtosis are NaN (with a warning
    naming it). NaN/inf weights and a model that cannot run on the data are refused up front.
    """
    percentile, tails, edges_np = _checked_levels(percentile, tails, bins, z_range)
    named = select_parameters(model, include, params)
    objective = as_objective(loss_fn, model)
    batches = as_batches(data)
    check_finite_parameters(model)
    check_model_accepts(model, objective, batches[0])
    active = use_ranks(distributed)
    per_batch = _batch_statistics(model, objective, batches, named, edges_np, percentile, tails, full_data,
                                  main_progress(progress), active)
    names, numel, stats = _used_tensors(named, per_batch)
    sizes = [batch_size(b) for b in batches]
    settings = {
        "percentile": percentile, "tails": tails, "full_data": bool(full_data), "include": include,
        "batch_sizes": sizes, "n_samples": int(sum(sizes)), "model_fingerprint": model_fingerprint(model),
        "model_class": type(model).__name__, "world_size": rank_and_world(active)[1], "provenance": provenance(),
    }
    return ZScoreResult(_zscore_dataset(names, numel, stats, edges_np, tails), settings)
