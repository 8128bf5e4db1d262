"""The training loop: :func:`fit`.

One step of a sharpness-aware optimizer (SAM, ASAM, ZSharp, Friendly-SAM) is the two-pass protocol
of Foret et al. 2021: forward/backward at w, ``first_step`` (ascend to w + e(w)), forward/backward
on the SAME batch at w + e, optional clipping of that gradient g', ``second_step`` (restore w, base
step with g'). Plain SGD/Adam/AdamW take one pass. Train loss and accuracy are those of the first
pass (at w). With ``bn_bypass`` the BatchNorm running statistics are frozen during the second pass
(:func:`sharpscope.optim.bn.frozen_running_stats`); by default they update in both passes, as in
the paper's code.

Reproducibility: batch order and augmentation of epoch ``e`` come from a generator seeded by
``(seed, e)``, and the checkpoint stores model, optimizer, schedule position and RNG states, so on
the CPU ``epochs=2`` equals ``epochs=1`` followed by ``resume`` with ``epochs=2`` bit for bit.

Several processes (``torchrun --nproc_per_node N -m sharpscope train ...``, or :func:`fit` inside any
initialised ``torch.distributed`` group): the model is wrapped in ``DistributedDataParallel``;
``batch_size`` is the global batch, each rank takes ``batch_size / N`` examples of every step from
its padded strided shard of the epoch's shared permutation (:func:`rank_batches`); the step is
:class:`TrainStep` (``ascent`` local or global, ``accumulate`` micro-batches); the test set is
evaluated data-parallel and the metrics are reduced over ranks. Rank 0 alone owns the run folder
(lock, recovery, every file, written atomically in the commit order of
:mod:`sharpscope.train.run_folder`); the others wait at a barrier after each epoch. Checkpoints hold
the bare model's weights (no ``module.`` prefix) plus every rank's RNG state (and, with local ascent,
per-replica optimizer state such as F-SAM's momentum), so ``resume`` with the same number of
processes is bit-exact; with another number it continues from rank 0's state. A failed collective (a
peer died, or ``dist_timeout`` passed) raises :class:`sharpscope.distributed.DistributedFailure`
(one line); nothing partial is left and ``resume`` continues from the last committed epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist_
from .._progress import progress
from ..analysis.batching import Batch, batch_size, eval_mode, slice_batch
from ..analysis.evaluation import LossAndAccuracy, full_data_loss, non_finite_tensors, weighted_loss_sums
from ..analysis.objective import ClassificationLoss, Objective, as_objective
from ..data.augment import random_crop_flip
from ..data.dataset import TensorData
from ..errors import UserInputError
from ..threads import fixed_thread_count, forward_backward_trial, thread_policy
from .batches import BatchData, channels_last
from .checkpoint import checkpoint_bytes, load_checkpoint, rng_state, set_rng_state, to_cpu
from .config import (
    RESUMABLE_FIELDS,
    SHARPNESS_AWARE,
    TrainConfig,
    build_optimizer,
    lr_factor,
    resume_conflicts,
)
from .layout import RunLayout
from .metrics import MaskLog
from .run_folder import RunFolder


class TrainingDiverged(UserInputError):
    """The train or test loss or the weights became NaN or infinite (usually: learning rate or rho too large)."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (in train mode) and the logs."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_test_acc: float | None
    out: Path | None
    masks: pd.DataFrame = field(default_factory=pd.DataFrame)
    tracking: pd.DataFrame = field(default_factory=pd.DataFrame)  # rows of the tracker (config.track)

    def metrics(self) -> pd.DataFrame:
        """The per-epoch history as a DataFrame."""
        return pd.DataFrame(self.history)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other names are checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _EvalBatches(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """The evaluation batches of ``data`` in order, built on demand (never all held at once)."""

    def __init__(self, data: TensorData, batch_size: int, device: torch.device, channels_last: bool) -> None:
        self.data, self.batch_size, self.device, self.channels_last = data, batch_size, device, channels_last

    def __len__(self) -> int:
        return self.data.num_batches(self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = self.data.normalized(self.data.inputs[rows].to(self.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.data.targets[rows].to(self.device)


def _upcast(out: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) to float32 for the loss; float64 stays float64."""
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(out), y)


def evaluate(model: nn.Module, data: TensorData, batch_size: int = 1024, device: torch.device | None = None,
             amp: str = "off", channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (eval mode inside, train flag restored).

    The loss is ``sum_b (n_b / N) CE_b`` (:func:`sharpscope.analysis.evaluation.full_data_loss`).
    """
    device = device or next(model.parameters()).device
    with eval_mode(model):
        result = full_data_loss(model, _cross_entropy, _EvalBatches(data, batch_size, device, channels_last),
                                with_accuracy=True, context=lambda: _autocast(device, amp))
    assert isinstance(result, LossAndAccuracy)
    return result.loss, result.accuracy


def training_objective(config: TrainConfig) -> ClassificationLoss:
    """The default loss :func:`fit` descends: cross-entropy with ``config.label_smoothing`` (half-precision
    logits upcast to float32)."""
    smoothing = config.label_smoothing

    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_upcast(out), y, label_smoothing=smoothing)

    objective = ClassificationLoss(cross_entropy)
    objective._sharpscope_default = True  # type: ignore[attr-defined]  # the run's identity omits it
    return objective


@dataclass
class StepOutcome:
    """What one :meth:`TrainStep.on_batch` gives: the first-pass loss (mean over the batch's ``count``
    targets), the outputs of each micro-batch, the micro-batches and ZSharp's mask statistics (or None)."""

    loss: torch.Tensor
    count: int
    outputs: list[Any]
    chunks: list[Batch]
    masks: pd.DataFrame | None

    def correct(self, objective: Objective) -> torch.Tensor | None:
        """Correct predictions of the first pass, or None when the objective has no accuracy."""
        total = None
        for out, chunk in zip(self.outputs, self.chunks):
            part = objective.correct(out, chunk)
            if part is None:
                return None
            total = part if total is None else total + part
        return total


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    groups = list(optimizer.param_groups)
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None:
        groups += [g for g in base.param_groups if all(g is not h for h in groups)]
    for group in groups:
        group["lr"] = lr


class TrainStep:
    """One optimizer step on one batch (one or two passes); returns the first-pass loss and logits.

    ``step(x, y, log_masks)`` -> ``(loss, logits, mask_stats or None)``; used by :func:`fit` and the benchmark.
    :meth:`on_batch` takes any batch the ``objective`` understands (default: the config's cross-entropy,
    label smoothing included) and returns a :class:`StepOutcome`. Both passes of a sharpness-aware
    optimizer use the same objective on the same batch.

    With ``config.accumulate = K`` the batch is split into K micro-batches :math:`b_k` with :math:`c_k`
    targets (``objective.count``: examples, or target tokens of a language model) out of :math:`c`; each
    pass accumulates :math:`\\sum_k (c_k/c) \\nabla L_k`, which is the gradient of the mean
    loss over the whole batch (exactly, up to rounding, for a model without BatchNorm: with BatchNorm
    each micro-batch is normalised with its own statistics and the running statistics are updated
    K times). Pass 1 (at w) gives one ascent, pass 2 (at w + e, on the same micro-batches) one descent.

    Under DDP (``ddp`` given), every micro-batch but the last runs under ``no_sync()``; with
    ``config.ascent == "local"`` all of pass 1 does, so each replica ascends with its own gradient
    (per-replica Z-scores and masks for ZSharp); with ``"global"`` the pass-1 gradient is all-reduced,
    so the ascent is the one of a single process on the whole (global) batch. Pass 2 is always
    all-reduced.
    """

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 config: TrainConfig, device: torch.device, ddp: DistributedDataParallel | None = None,
                 objective: Objective | None = None) -> None:
        self.model, self.forward, self.optimizer, self.config, self.device = model, forward, optimizer, config, device
        self.objective = objective if objective is not None else training_objective(config)
        self.two_pass = config.optimizer in SHARPNESS_AWARE
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ddp = ddp
        self.accumulate = config.accumulate
        self.sync_ascent = config.ascent == "global"
        if self.two_pass and config.bn_bypass:
            from ..optim.bn import frozen_running_stats
            self.second_pass_context = lambda: frozen_running_stats(model)
        else:
            self.second_pass_context = contextlib.nullcontext

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        with _autocast(self.device, self.config.amp):
            out = self.objective.outputs(self.forward, batch)
        return self.objective.loss(_upcast(out) if isinstance(out, torch.Tensor) else out, batch), out

    def _clip(self) -> None:
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    def _chunks(self, batch: Batch) -> tuple[list[Batch], int]:
        """The micro-batches of ``batch`` (``config.accumulate`` of them) and its number of targets."""
        n = batch_size(batch)
        k = max(1, min(self.accumulate, n))
        if k == 1:
            return [batch], self.objective.count(batch)
        bounds = [int(part[0]) for part in torch.tensor_split(torch.arange(n), k)] + [n]
        chunks = [slice_batch(batch, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        return chunks, sum(self.objective.count(c) for c in chunks)

    def _pass(self, chunks: list[Batch], n: int, sync: bool, keep_outputs: bool) -> tuple[torch.Tensor, list[Any]]:
        """Forward/backward over the micro-batches: ``grad += sum_k (c_k / c) grad L_k``; DDP reduces on the
        last one only, and only when ``sync``. Returns the weighted loss and (optionally) the outputs."""
        total: torch.Tensor | None = None
        outs = []
        for i, chunk in enumerate(chunks):
            weight = self.objective.count(chunk) / n if len(chunks) > 1 else 1.0
            with self._sync(sync and i == len(chunks) - 1):
                loss, out = self._loss(chunk)
                (loss if weight == 1.0 else loss * weight).backward()
            part = loss.detach() if weight == 1.0 else loss.detach() * weight
            total = part if total is None else total + part
            if keep_outputs:
                outs.append(out.detach() if isinstance(out, torch.Tensor) else out)
        assert total is not None
        return total, outs

    def on_batch(self, batch: Batch, log_masks: bool) -> StepOutcome:
        """One optimizer step on ``batch`` (see the class docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        chunks, n = self._chunks(batch)
        loss, outs = self._pass(chunks, n, sync=not self.two_pass or self.sync_ascent, keep_outputs=True)
        masks = None
        if not self.two_pass:
            self._clip()
            self.optimizer.step()
        else:
            self.optimizer.first_step(zero_grad=True)
            if log_masks:
                masks = self._mask_stats()
            with self.second_pass_context():
                self._pass(chunks, n, sync=True, keep_outputs=False)
            self._clip()  # clipping g (before the ascent) would do nothing: e is normalised
            self.optimizer.second_step(zero_grad=True)
        return StepOutcome(loss, n, outs, chunks, masks)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, log_masks: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame | None]:
        outcome = self.on_batch((x, y), log_masks)
        return outcome.loss, torch.cat(outcome.outputs), outcome.masks

    def _mask_stats(self) -> pd.DataFrame:
        """ZSharp's mask statistics; under DDP with local ascent reduced over the ranks (a collective)."""
        stats = self.optimizer.mask_stats
        if self.ddp is None or self.sync_ascent or not dist_.is_distributed():
            return stats  # global ascent: every rank computed the single-process masks
        return reduce_mask_stats(dist_.all_gather_object(stats), self.config.mask_ranks)


def reduce_mask_stats(frames: Sequence[pd.DataFrame], how: str = "reduce") -> pd.DataFrame:
    """One mask-statistics frame from those of the ranks (local ascent: every replica has its own mask).

    ``reduce``: one row per layer; ``numel`` and ``kept`` are summed over the ranks (so ``kept_fraction
    = kept / numel`` is the mean of the replicas' kept fractions), ``threshold``, ``grad_norm`` and
    ``perturbation_norm`` are the means over ranks, ``fallback`` is true if any replica fell back, and
    ``ranks`` says how many replicas were pooled. ``per-rank``: the rows of every rank with a ``rank`` column.
    """
    frames = [f for f in frames if f is not None]
    if how == "per-rank":
        tagged = [f.assign(rank=r) for r, f in enumerate(frames)]
        return pd.concat(tagged, ignore_index=True)
    first = frames[0]
    out = first.copy()
    out["numel"] = sum(f["numel"].to_numpy() for f in frames)
    out["kept"] = sum(f["kept"].to_numpy() for f in frames)
    out["kept_fraction"] = out["kept"] / out["numel"]
    for column in ("threshold", "grad_norm", "perturbation_norm"):
        out[column] = np.mean([f[column].to_numpy(dtype=np.float64) for f in frames], axis=0)
    out["fallback"] = np.any([f["fallback"].to_numpy(dtype=bool) for f in frames], axis=0)
    out["ranks"] = len(frames)
    return out


@dataclass
class _Run:
    """The state one call of :func:`fit` works on: model, optimizer, data, logs and progress."""

    model: nn.Module
    config: TrainConfig
    device: torch.device
    spec: dict[str, Any] | None
    metadata: dict[str, Any]
    train_data: TensorData | BatchData
    test_data: TensorData | BatchData | None
    folder: RunFolder | None
    objective: Objective
    optimizer: torch.optim.Optimizer = field(init=False)
    optimizer_config: dict[str, Any] = field(init=False)
    masks: MaskLog = field(init=False)
    identity: dict[str, Any] = field(init=False)
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_done: int = 0
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    forward: nn.Module | None = None
    stepper: TrainStep | None = None
    threads: int | None = None  # intra-op threads of the run's CPU work (None: not decided yet)
    ddp: DistributedDataParallel | None = None  # the DDP wrapper under torch.distributed (world size > 1)
    tracker: Any = None  # SharpnessTracker when config.track names measures (rank 0 only)
    tracker_state: dict[str, Any] | None = None  # tracker state of the checkpoint resumed from
    tracking_seconds: float = 0.0  # time spent in the tracker during the current epoch
    has_accuracy: bool = True  # whether the objective gives an accuracy (objective.correct is not None)

    def __post_init__(self) -> None:
        # numpy's and python's generators too: checkpoints store them, so they must not depend on the process.
        torch.manual_seed(self.config.seed + dist_.rank())  # per-rank stream (dropout); rank 0 as one process
        np.random.seed(self.config.seed % 2**32)
        random.seed(self.config.seed)
        self.model.to(self.device)
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.optimizer_config = build_optimizer(self.model, self.config)
        self.masks = MaskLog(self.folder.layout.masks if self.folder is not None else None)
        self.identity = _identity(self.train_data, self.test_data, self.objective)

    @property
    def generic(self) -> bool:
        """Whether the training data are batches (:class:`BatchData`) rather than a :class:`TensorData`."""
        return isinstance(self.train_data, BatchData)


def _identity(train: TensorData | BatchData, test: TensorData | BatchData | None, objective: Objective
              ) -> dict[str, Any]:
    """What a resumed run must match: the datasets (name, size, classes) and, for batches, the objective."""
    if isinstance(train, TensorData):
        identity = {"train": train.name, "test": test.name if test is not None else None,
                    "train_size": len(train), "num_classes": train.num_classes}
    else:
        identity = {"train": train.name, "test": test.name if test is not None else None,
                    "train_size": train.num_examples, "num_classes": None, "train_batches": len(train)}
    if not isinstance(train, TensorData) or not _is_default(objective):
        identity["loss"] = objective.name + ":" + _loss_name(objective)
    return identity


def _is_default(objective: Objective) -> bool:
    return getattr(objective, "_sharpscope_default", False)


def _loss_name(objective: Objective) -> str:
    """A name of the user's loss that is the same in every process (no memory address)."""
    fn = getattr(objective, "loss_fn", None) or getattr(objective, "fn", None)
    if fn is None:
        return objective.describe()
    return str(getattr(fn, "__qualname__", type(fn).__qualname__))


def fit(model: nn.Module, train_data: Any, test_data: Any = None,
        config: TrainConfig | None = None, *, loss_fn: Any = None, out: str | Path | None = None,
        resume: bool | str | Path = False, spec: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, **overrides: Any) -> FitResult:
    """Train ``model`` on ``train_data``, evaluating on ``test_data`` after every epoch.

    Two forms. With :class:`sharpscope.data.TensorData` splits, ``fit`` shuffles (from ``(seed, epoch)``),
    augments and batches the data itself (``config.batch_size``). With any re-iterable of batches (a
    ``DataLoader``, a list of ``(x, y)`` tuples or of dicts, a map-style ``Dataset``;
    :mod:`sharpscope.train.batches`) each epoch iterates ``train_data`` once, one optimizer step per
    batch, in the order it yields (the loader decides batch size, order and augmentation). The train
    loss is ``sum_b c_b loss_b / sum_b c_b`` over the first passes, ``c_b = objective.count(batch)``
    (examples; target tokens of a language model); accuracies are ``None`` when the objective has none.
    Resume replays the batch order when the loader's order comes from its ``generator`` (seeded here
    from ``(seed, epoch)`` before each epoch) or from torch's global generator (seeded by ``fit``,
    stored in checkpoints): a ``DataLoader(shuffle=True)`` resumes bit for bit on the CPU; a sampler
    with its own private generator does not. Batches run in one process (``torch.distributed`` needs
    ``TensorData``).

    Args:
        model: the ``nn.Module`` to train (in place); a classifier (logits out) with the default loss.
        train_data, test_data: :class:`sharpscope.data.TensorData` splits or re-iterables of batches
            (test is optional).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
            (``fit(model, train, test, optimizer="zsharp", epochs=5)``).
        loss_fn: the loss descended (both passes of a sharpness-aware optimizer), evaluated and tracked:
            ``loss_fn(outputs, targets)``, ``loss_fn(model, batch)``, ``"lm"`` (next-token
            cross-entropy), ``"hf"`` (the model's own ``.loss``) or a :class:`sharpscope.Objective`
            (:func:`~sharpscope.analysis.objective.as_objective`). Default: cross-entropy with
            ``config.label_smoothing``.
        out: run folder for ``last.pt``, ``best.pt``, ``epoch_XXXX.pt``, ``metrics.jsonl``, ``masks.csv``
            and ``config.json``; None keeps everything in memory. One process at a time writes it.
        resume: True continues the run in ``out`` (from ``last.pt``; from the start when it was
            killed before its first epoch was committed) and first completes files a crash left
            missing; a path continues from that checkpoint. Training then runs up to ``config.epochs``
            in total; a run that already has them is only completed. The dataset and every setting
            that changes the weights must be those of the run (:data:`~sharpscope.train.config.RESUMABLE_FIELDS`
            may change).
        spec: model spec stored in checkpoints (default: ``model.sharpscope_spec`` set by
            :func:`sharpscope.models.build_model`), so :func:`sharpscope.load_checkpoint` can rebuild it.
        metadata: JSON-able facts about the run stored in checkpoints and ``config.json`` (e.g. dataset root).
        on_epoch: called with each epoch's metrics row after its files are written.

    Returns:
        :class:`FitResult` with the model, the per-epoch history (``time_s`` and ``images_per_s`` count the
        training and test evaluation only; the tracker's time is ``tracking_s``) and the mask statistics.

    Raises:
        UserInputError: bad configuration, run folder or resume; :class:`TrainingDiverged` on a non-finite
            loss or weights (nothing of that epoch is written). OSError: a file could not be written (full
            disk, read-only folder); the message names it and the folder stays resumable.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    train_data, test_data = _as_data(train_data, "train_data", config), _as_data(test_data, "test_data", config)
    objective = _objective(loss_fn, model, config)
    device, spec = _check_inputs(model, train_data, config, spec)
    parts = (model, config, device, spec, dict(metadata or {}), train_data, test_data)
    if out is None:
        if resume is True:
            raise UserInputError("resume=True needs out= (the run folder holding last.pt)")
        return _fit(_Run(*parts, None, objective), resume, on_epoch)
    if not dist_.is_main():  # only rank 0 owns (locks, recovers, writes) the run folder
        return _fit(_Run(*parts, None, objective), resume, on_epoch)
    folder = RunFolder(Path(out))
    with folder.locked():
        return _fit(_Run(*parts, folder, objective), resume, on_epoch)


def _as_data(data: Any, what: str, config: TrainConfig) -> TensorData | BatchData | None:
    """A :class:`TensorData` as it is; anything else as :class:`BatchData` (checked: re-iterable, sized)."""
    if data is None or isinstance(data, TensorData):
        return data
    return BatchData(data, what, batch_size=config.batch_size if what == "train_data" else config.eval_batch_size,
                     shuffle=what == "train_data")


def _objective(loss_fn: Any, model: nn.Module, config: TrainConfig) -> Objective:
    """The objective of ``loss_fn`` (default: the config's cross-entropy); label smoothing belongs to the default."""
    if loss_fn is None:
        return training_objective(config)
    if config.label_smoothing:
        raise UserInputError("label_smoothing applies to the default cross-entropy; with loss_fn= put the smoothing "
                             "into your loss (e.g. F.cross_entropy(..., label_smoothing=0.1))")
    return as_objective(loss_fn, model)


def _check_inputs(model: nn.Module, train_data: TensorData | BatchData, config: TrainConfig,
                  spec: dict[str, Any] | None) -> tuple[torch.device, dict[str, Any] | None]:
    if len(train_data) == 0:
        raise UserInputError("the training data is empty")
    device = resolve_device(config.device)
    if isinstance(train_data, BatchData):
        if dist_.is_distributed():
            raise UserInputError("under torch.distributed fit needs TensorData (it shards each epoch's permutation "
                                 "over the ranks); train on batches (a DataLoader) in one process")
        return device, spec if spec is not None else getattr(model, "sharpscope_spec", None)
    if dist_.is_distributed():
        _check_distributed(config, device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", dist_.local_rank())
    spec = spec if spec is not None else getattr(model, "sharpscope_spec", None)
    if spec is not None and spec.get("num_classes") not in (None, train_data.num_classes):
        raise UserInputError(f"the model has {spec['num_classes']} outputs but {train_data.name} has "
                             f"{train_data.num_classes} classes")
    return device, spec


def _check_distributed(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings that cannot work with ``world_size`` processes (one line each)."""
    world = dist_.world_size()
    if config.batch_size % world:
        raise UserInputError(f"--batch-size {config.batch_size} is the global batch and must be divisible by the "
                             f"{world} processes (each takes batch_size / {world}); pick a multiple of {world}")
    if config.sync_bn and device.type != "cuda":
        raise UserInputError("--sync-bn needs CUDA (SyncBatchNorm runs on GPUs with NCCL); drop it on the CPU")


def _fit(run: _Run, resume: bool | str | Path, on_epoch: Callable[[dict[str, Any]], None] | None) -> FitResult:
    """Restore or start, complete the folder, then train the remaining epochs."""
    with _distributed_failures():
        _restore_or_start(run, resume)
        _prepare_training(run)
        try:
            with _training_threads(run):
                for epoch in range(run.epochs_done, run.config.epochs):
                    row = _run_epoch(run, epoch)
                    if on_epoch is not None:
                        on_epoch(row)
        finally:
            if run.tracker is not None:
                run.tracker.close()
    return FitResult(model=run.model, history=run.history,
                     best_test_acc=run.best if run.test_data is not None and run.has_accuracy else None,
                     out=run.folder.folder if run.folder is not None else None, masks=run.masks.frame(),
                     tracking=run.tracker.to_dataframe() if run.tracker is not None else pd.DataFrame())


@contextlib.contextmanager
def _distributed_failures() -> Any:
    """Under torch.distributed, a collective that fails (a peer died, or the timeout passed) becomes one
    :class:`~sharpscope.distributed.DistributedFailure` line instead of a traceback or a hang."""
    try:
        yield
    except dist_.DistributedFailure:
        raise
    except RuntimeError as error:
        if not dist_.is_distributed() or not dist_.is_collective_failure(error):
            raise  # a bug or a computation error keeps its traceback
        raise dist_.DistributedFailure(dist_.failure_line("training step", error)) from error


def _training_threads(run: _Run) -> contextlib.AbstractContextManager[int]:
    """The thread policy for the run's CPU work (:mod:`sharpscope.threads`), decided once per run.

    The count chosen when the run started is stored in its checkpoints and reused on ``--resume``
    (unless fixed by the caller), because the bits of the results can depend on it.
    """
    if dist_.is_distributed() and run.threads is None and fixed_thread_count() is None and run.device.type == "cpu":
        # every rank runs with rank 0's count (torchrun sets OMP_NUM_THREADS=1), so resume reproduces it
        run.threads = int(dist_.broadcast_object(torch.get_num_threads()))  # type: ignore[arg-type]
    if run.device.type != "cpu" or fixed_thread_count() is not None or run.threads is not None:
        return _recording(run, thread_policy(None, run.threads if fixed_thread_count() is None else None))
    if run.generic:  # reading a user's loader ahead could move the random state its shuffling draws from
        return _recording(run, thread_policy(None, None))
    x, y = next(iter(run.train_data.batches(run.config.batch_size, shuffle=False, augment=False, device=run.device)))
    loss = _cross_entropy if _is_default(run.objective) else run.objective
    return _recording(run, thread_policy(forward_backward_trial(run.model, loss, (x, y))))


@contextlib.contextmanager
def _recording(run: _Run, policy: contextlib.AbstractContextManager[int]) -> Any:
    with policy as chosen:
        run.threads = chosen
        yield chosen


def _restore_or_start(run: _Run, resume: bool | str | Path) -> None:
    """Load the checkpoint to resume from (if any), check it belongs to this run, and recover the folder.

    Under torch.distributed rank 0 does all of this and tells the others which checkpoint to load (a
    path every rank can read) or the one-line error to raise; each rank then takes its own RNG (and,
    with local ascent, its own optimizer) state from the checkpoint's per-rank list.
    """
    if not dist_.is_distributed():
        _restore_or_start_here(run, resume)
        return
    error, source, raw = None, None, {}
    if dist_.is_main():
        try:
            source, raw = _restore_or_start_here(run, resume)
        except UserInputError as exc:
            error = str(exc)
    error, shared = dist_.broadcast_object((error, str(source) if source is not None else None))  # type: ignore[misc]
    if error is not None:
        raise UserInputError(error)
    if shared is not None and not dist_.is_main():
        raw = _restore(run, Path(shared))
    _restore_rank_state(run, raw)


def _restore_rank_state(run: _Run, raw: dict[str, Any]) -> None:
    """This rank's RNG and per-replica optimizer state from a checkpoint written with the same world size."""
    ranks = raw.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != dist_.world_size():
        return
    mine = ranks[dist_.rank()]
    set_rng_state(mine["rng"])
    if mine.get("optimizer") is not None:
        run.optimizer.load_state_dict(mine["optimizer"])


def _restore_or_start_here(run: _Run, resume: bool | str | Path) -> tuple[Path | None, dict[str, Any]]:
    """:func:`_restore_or_start` in this process; returns the checkpoint loaded (or None) and its dict."""
    layout = run.folder.layout if run.folder is not None else None
    if layout is not None and not resume and layout.last.exists():
        raise UserInputError(f"--out {str(layout.folder)!r} already holds a run (last.pt); pass --resume to "
                             f"continue it or choose another folder")
    source = Path(str(resume)) if resume and resume is not True else None
    if resume is True and layout is not None and layout.last.exists():
        source = layout.last
    raw: dict[str, Any] = {}
    if source is not None:
        raw = _restore(run, source)
    elif resume is True:
        _check_started_run(run)
    if run.epochs_done > run.config.epochs:
        raise UserInputError(f"{str(source)!r} already has {run.epochs_done} epochs, more than the {run.config.epochs}"
                             f" asked for; pass --epochs {run.epochs_done} or more")
    if run.folder is not None:
        committed = layout is not None and source is not None and source.resolve() == layout.last.resolve()
        run.folder.recover(layout.last.read_bytes() if committed else None, raw, run.config.save_every, run.masks)
    return source, raw


def _check_started_run(run: _Run) -> None:
    """``resume`` of a run killed before its first epoch was committed: it starts over, if it is the same run."""
    assert run.folder is not None
    stored = run.folder.read_config()
    if stored is None:
        raise UserInputError(f"nothing to resume: {str(run.folder.layout.last)!r} does not exist (and no "
                             f"{RunLayout.CONFIG} of a started run); start the run without --resume")
    _check_same_run(run, stored.get("config"), stored.get("data"), str(run.folder.layout.config))


def _restore(run: _Run, source: Path) -> dict[str, Any]:
    """Load ``source`` into the model, optimizer, RNGs and logs of ``run``; return the stored dict."""
    ckpt = load_checkpoint(source, map_location=run.device, model=run.model)
    if ckpt.is_bare or ckpt.optimizer_state is None or ckpt.rng is None:
        raise UserInputError(f"{str(source)!r} holds only weights; resuming needs a checkpoint written by fit")
    saved = ckpt.optimizer_config
    if (saved.get("name"), saved.get("base")) != (run.optimizer_config["name"], run.optimizer_config["base"]):
        raise UserInputError(f"{str(source)!r} was trained with {saved.get('name')}/{saved.get('base')}, not "
                             f"{run.optimizer_config['name']}/{run.optimizer_config['base']}; resume with the same "
                             f"optimizer")
    _check_same_run(run, ckpt.config, ckpt.raw.get("data"), str(source))
    run.optimizer.load_state_dict(ckpt.optimizer_state)
    run.epochs_done, run.step, run.history = ckpt.epoch, ckpt.step, list(ckpt.history)
    run.best, run.best_epoch = ckpt.raw.get("best_test_acc"), ckpt.raw.get("best_epoch")
    if run.threads is None and isinstance(ckpt.raw.get("threads"), int) and ckpt.raw["threads"] >= 1:
        run.threads = min(ckpt.raw["threads"], torch.get_num_threads())
    run.tracker_state = ckpt.raw.get("tracker")
    set_rng_state(ckpt.rng)
    run.model.train()
    return ckpt.raw


def _check_same_run(run: _Run, stored_config: Any, stored_data: Any, where: str) -> None:
    """Refuse to resume with another dataset or another setting that changes the weights."""
    if stored_config:
        conflicts = resume_conflicts(stored_config, run.config)
        if conflicts:
            raise UserInputError(f"cannot resume {where!r} with other settings: {'; '.join(conflicts)}; resume with "
                                 f"the run's settings (only {', '.join(RESUMABLE_FIELDS)} may change) or start a "
                                 f"new run")
    if isinstance(stored_data, dict) and any(stored_data.get(k) != v for k, v in run.identity.items()):
        def shown(d: dict[str, Any]) -> str:
            return f"{d.get('train')} ({d.get('train_size')} examples, {d.get('num_classes')} classes)"

        raise UserInputError(f"cannot resume {where!r} on other data: the run was trained on {shown(stored_data)}, "
                             f"not {shown(run.identity)}; resume with the run's dataset")


def _prepare_training(run: _Run) -> None:
    """Data on the device, the (compiled) forward, the step, and ``config.json``."""
    if run.device.type == "cuda" and not run.generic:  # keep the uint8 images in device memory, augment there
        run.train_data = run.train_data.to(run.device)
        run.test_data = run.test_data.to(run.device) if isinstance(run.test_data, TensorData) else run.test_data
    forward: nn.Module = run.model
    if dist_.is_distributed():
        if run.config.sync_bn:
            run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)  # same Parameter objects
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.ddp = forward = DistributedDataParallel(run.model, device_ids=ids)
    run.forward = torch.compile(forward) if run.config.compile else forward
    run.stepper = TrainStep(run.model, run.forward, run.optimizer, run.config, run.device, run.ddp, run.objective)
    if run.folder is not None:
        run.folder.write_config({"config": run.config.to_dict(), "model_spec": run.spec,
                                 "optimizer": run.optimizer_config, "data": run.identity, "metadata": run.metadata})
    _start_tracker(run)
    run.model.train()


def _start_tracker(run: _Run) -> None:
    """The :class:`~sharpscope.track.SharpnessTracker` of ``config.track`` (rank 0 tracks the replicated model).

    Its probe set is the first ``track_samples`` training examples (with batches: the first batches of
    epoch 0 up to that many examples) and its loss the training objective (label smoothing included); on
    resume the loggers drop rows from the checkpoint's step on (and MLflow/W&B reopen the run they logged to)
    and the warm-start vectors and counters come back from the checkpoint, so the rows equal an
    uninterrupted run's. Measures use their own random generators: the weights do not change.
    """
    config = run.config
    if not config.track or not dist_.is_main():
        return
    from ..track.run import run_tracker

    probe: Any = run.train_data
    if isinstance(run.train_data, BatchData):
        probe = run.train_data.first(config.track_samples, config.seed, run.device)
    run.tracker = run_tracker(run.model, run.objective, probe,
                              run.folder.folder if run.folder is not None else None, track=config.track,
                              every=config.track_every, samples=config.track_samples, log=config.log,
                              resume_step=run.step if run.step > 0 else None, state=run.tracker_state)


def _run_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """Train, check for divergence, evaluate, and commit one epoch; return its metrics row."""
    run.tracking_seconds = 0.0
    start = time.perf_counter()
    train_loss, train_acc, lr, seen = _train_epoch(run, epoch, start)
    train_time = time.perf_counter() - start - run.tracking_seconds  # the optimizer's cost alone
    if not math.isfinite(train_loss):
        raise _diverged(run, epoch, lr, "train loss")
    bad = non_finite_tensors(run.model)
    if bad:
        raise _diverged(run, epoch, lr, f"weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
    test_loss, test_acc = (None, None) if run.generic else (float("nan"), float("nan"))  # TensorData: as before
    if run.test_data is not None:
        assert run.forward is not None
        test_loss, test_acc = _evaluate_test(run)
        if not math.isfinite(test_loss):
            raise _diverged(run, epoch, lr, "test loss")
    row = {"epoch": epoch + 1, "step": run.step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
           "test_loss": test_loss, "test_acc": test_acc, "time_s": time.perf_counter() - start - run.tracking_seconds,
           "images_per_s": seen / max(train_time, 1e-9)}
    if run.tracker is not None:  # kept apart so that time_s and images/s compare optimizers, not tracking
        row["tracking_s"] = run.tracking_seconds
    _commit(run, row, lr)
    return row


def _evaluate_test(run: _Run) -> tuple[float, float | None]:
    """Test loss and accuracy; under DDP each rank evaluates a disjoint shard, weighted by its size."""
    assert run.test_data is not None and run.forward is not None
    config = run.config
    if isinstance(run.test_data, BatchData) or not _is_default(run.objective):
        return _evaluate_batches(run)
    if not dist_.is_distributed():
        return evaluate(run.forward, run.test_data, config.eval_batch_size, run.device, config.amp,
                        config.channels_last)
    shard = run.test_data.subset(dist_.shard_indices(torch.arange(len(run.test_data)), uneven="keep"))
    totals = torch.zeros(3, dtype=torch.float64)
    if len(shard):
        loss, acc = evaluate(run.model, shard, config.eval_batch_size, run.device, config.amp, config.channels_last)
        totals += torch.tensor([loss * len(shard), acc * len(shard), len(shard)], dtype=torch.float64)
    totals = _reduced(run, totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _test_batches(run: _Run) -> Iterator[Batch]:
    """The test batches on the device (a :class:`TensorData` cut into ``eval_batch_size`` batches)."""
    data = run.test_data
    if isinstance(data, BatchData):
        yield from data.epoch(0, run.config.seed, run.device)
    elif data is not None:
        yield from _EvalBatches(data, run.config.eval_batch_size, run.device, False)


def _evaluate_batches(run: _Run) -> tuple[float, float | None]:
    """Test loss ``sum_b c_b loss_b / sum_b c_b`` (``c_b = objective.count``) and accuracy (None without one), in
    eval mode, streamed one batch at a time (:func:`~sharpscope.analysis.evaluation.weighted_loss_sums`)."""
    objective, counts = run.objective, []

    def weighted() -> Iterator[tuple[Batch, float]]:
        for batch in _test_batches(run):
            counts.append(objective.count(batch))
            yield (channels_last(batch) if run.config.channels_last else batch), float(counts[-1])

    assert run.forward is not None
    with eval_mode(run.model):
        sums = weighted_loss_sums(run.forward, objective, weighted(), with_accuracy=run.has_accuracy,  # type: ignore[arg-type]
                                  context=lambda: _autocast(run.device, run.config.amp))
    total = sum(counts)
    if total == 0:
        raise UserInputError("test_data has no targets to average the loss over (every label is ignore_index?)")
    loss, correct = sums.tolist()
    return loss / total, (correct / total if run.has_accuracy else None)


def _collective_device(run: _Run) -> torch.device:
    return run.device if dist_.backend() == "nccl" else torch.device("cpu")


def _reduced(run: _Run, values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over ranks (one all-reduce; on the device NCCL needs), on the CPU."""
    buffer = values.to(_collective_device(run), torch.float64)
    return dist_.all_reduce_sum(buffer).cpu()


def steps_per_epoch(data_size: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: ``ceil(n / B)`` in one process; under DDP each rank holds
    ``ceil(n / N)`` indices (padded shard) in batches of ``B / N``."""
    if world_size <= 1:
        return -(-data_size // batch_size)
    shard = -(data_size // -world_size)
    return -(shard // -(batch_size // world_size))


def _steps_per_epoch(run: _Run) -> int:
    if isinstance(run.train_data, BatchData):
        return len(run.train_data)  # one step per batch
    return steps_per_epoch(len(run.train_data), run.config.batch_size, dist_.world_size())


def rank_batches(data: TensorData, batch_size: int, seed: int, epoch: int, augment: bool | None,
                 device: torch.device, rank: int | None = None, world_size: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's training batches of ``epoch`` under DDP.

    Every rank draws the same permutation from the generator of ``(seed, epoch)`` (that of
    :meth:`TensorData.batches`), takes its padded strided shard (:func:`sharpscope.distributed.shard_indices`)
    and cuts it into batches of ``batch_size / N``, so the k-th batches of all ranks together are the
    one-process k-th batch. Augmentation draws come from a generator of ``(seed, epoch, rank)``: they
    differ between ranks and replay exactly.
    """
    r = dist_.rank() if rank is None else rank
    n = dist_.world_size() if world_size is None else world_size
    mine = dist_.shard_indices(dist_.epoch_permutation(len(data), seed, epoch), r, n, uneven="pad").to(data.inputs.device)
    local = batch_size // n
    augment = data.augment if augment is None else augment
    g = torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + r + 1) % (2**63))
    for i in range(-(-len(mine) // local)):
        idx = mine[i * local:(i + 1) * local]
        x, y = data.inputs[idx].to(device, non_blocking=True), data.targets[idx].to(device, non_blocking=True)
        if augment:
            x = random_crop_flip(x, g)
        yield data.normalized(x), y


def _epoch_batches(run: _Run, epoch: int) -> Iterator[Batch]:
    """The training batches of ``epoch`` on the device: this rank's shard under DDP, the shuffled
    :class:`TensorData` in one process, or the user's batches."""
    config, device = run.config, run.device
    if isinstance(run.train_data, BatchData):
        return run.train_data.epoch(epoch, config.seed, device)
    if dist_.is_distributed():
        return rank_batches(run.train_data, config.batch_size, config.seed, epoch, config.augment, device)
    return run.train_data.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                  augment=config.augment, device=device)


@dataclass
class _EpochSums:
    """Running sums of an epoch (on the device, no synchronisation per step): ``sum_b c_b loss_b``, correct
    predictions, targets ``sum_b c_b`` and examples (for the throughput)."""

    loss: torch.Tensor
    correct: torch.Tensor | None
    targets: int = 0
    examples: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> _EpochSums:
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device))

    def add(self, outcome: StepOutcome, objective: Objective, examples: int) -> None:
        self.loss += outcome.loss.double() * outcome.count
        correct = outcome.correct(objective) if self.correct is not None else None
        if correct is None:
            self.correct = None  # the objective has no accuracy: none is reported (never a made-up 0)
        else:
            self.correct += correct
        self.targets += outcome.count
        self.examples += examples

    def accuracy(self) -> float | None:
        return None if self.correct is None else float(self.correct) / max(self.targets, 1)


def _train_epoch(run: _Run, epoch: int, start: float) -> tuple[float, float | None, float, int]:
    """One pass over the shuffled training data: ``(mean loss, accuracy or None, last lr, examples seen)``."""
    config = run.config
    assert run.stepper is not None
    steps = _steps_per_epoch(run)
    sums = _EpochSums.zeros(run.device)
    bar = progress(_epoch_batches(run, epoch), enabled=config.progress and dist_.is_main(), total=steps,
                   desc=f"epoch {epoch + 1}/{config.epochs}")
    lr = config.base_lr
    for i, batch in enumerate(bar):
        lr = config.base_lr * lr_factor(config, run.step, steps)
        _set_lr(run.optimizer, lr)
        if config.channels_last:
            batch = channels_last(batch)
        log_masks = config.optimizer == "zsharp" and config.log_mask_every > 0 and run.step % config.log_mask_every == 0
        outcome = run.stepper.on_batch(batch, log_masks)
        if outcome.masks is not None:
            run.masks.add(run.step, epoch, outcome.masks)
        if run.tracker is not None:
            tracked = time.perf_counter()
            run.tracker.step(run.step, optimizer=run.optimizer)
            run.tracking_seconds += time.perf_counter() - tracked
        sums.add(outcome, run.objective, batch_size(batch))
        run.step += 1
        if config.progress and hasattr(bar, "set_postfix") and (i % 20 == 0 or i == steps - 1):
            _show_progress(bar, sums, start)
    run.has_accuracy = sums.correct is not None
    if sums.targets == 0:
        raise UserInputError("the training data has no targets to average the loss over (every label is "
                             "ignore_index?)")
    if dist_.is_distributed():  # the epoch's metrics over all ranks (padded duplicates included)
        correct = sums.correct.double() if sums.correct is not None else torch.zeros_like(sums.loss)
        totals = _reduced(run, torch.stack([sums.loss, correct,
                                            torch.tensor(float(sums.targets), dtype=torch.float64, device=run.device)]))
        accuracy = float(totals[1] / totals[2]) if sums.correct is not None else None
        return float(totals[0] / totals[2]), accuracy, lr, int(totals[2])
    return float(sums.loss) / sums.targets, sums.accuracy(), lr, sums.examples  # float() synchronises the device


def _show_progress(bar: Any, sums: _EpochSums, start: float) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    accuracy = sums.accuracy()
    shown = {"loss": f"{float(sums.loss) / max(sums.targets, 1):.4f}"}
    if accuracy is not None:
        shown["acc"] = f"{accuracy:.3f}"
    shown["img_s"] = f"{sums.examples / elapsed:.0f}"
    bar.set_postfix(refresh=False, **shown)


def _diverged(run: _Run, epoch: int, lr: float, what: str) -> TrainingDiverged:
    if run.folder is None:
        kept = "no checkpoint was written (no run folder)"
    elif run.history:
        kept = f"the last good checkpoint is kept ({str(run.folder.layout.last)!r}, epoch {run.history[-1]['epoch']})"
    else:
        kept = "no checkpoint was written (the first epoch diverged)"
    return TrainingDiverged(f"training diverged: non-finite {what} in epoch {epoch + 1}; lower --lr (now {lr:g}) "
                            f"or --rho; {kept}")


def _commit(run: _Run, row: dict[str, Any], lr: float) -> None:
    """Record the epoch in memory and, with a run folder, write its files in the commit order."""
    epoch = row["epoch"]
    run.history.append(row)
    score = _score(run, row)
    improved = run.best is None or score > run.best
    if improved:
        run.best, run.best_epoch = score, epoch
    run.epochs_done = epoch
    ranks = _rank_states(run)
    if run.tracker is not None:
        run.tracker.flush()  # rows past the checkpoint's step are dropped on resume (resume_step)
    if run.folder is not None:
        run.folder.commit_epoch(checkpoint_bytes(_payload(run, lr, ranks)), epoch=epoch, improved=improved,
                                save_every=run.config.save_every, history=run.history, masks=run.masks)
    dist_.barrier(run.config.dist_timeout)  # the others wait until rank 0 has committed the epoch


def _score(run: _Run, row: dict[str, Any]) -> float:
    """What ``best.pt`` maximises: the test (else train) accuracy, or minus the loss when there is no accuracy."""
    split = "test" if run.test_data is not None else "train"
    accuracy = row[f"{split}_acc"]
    return float(accuracy) if accuracy is not None else -float(row[f"{split}_loss"])


def _rank_states(run: _Run) -> list[dict[str, Any]] | None:
    """Under DDP, every rank's RNG state (and its optimizer state when replicas differ: local ascent with
    per-replica optimizer state such as F-SAM's momentum), gathered on every rank; None in one process."""
    if not dist_.is_distributed():
        return None
    own_state = (run.config.optimizer in SHARPNESS_AWARE and run.config.ascent == "local"
                 and len(run.optimizer.state) > 0)
    mine = {"rng": rng_state(), "optimizer": to_cpu(run.optimizer.state_dict()) if own_state else None}
    return dist_.all_gather_object(mine)  # type: ignore[return-value]


def _payload(run: _Run, lr: float, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a checkpoint stores (see :mod:`sharpscope.train.checkpoint`); the weights are those of the bare
    model (never a DDP ``module.`` prefix), ``ranks`` the per-rank states of a DDP run."""
    steps = _steps_per_epoch(run)
    return {"model_spec": run.spec, "state_dict": run.model.state_dict(), "optimizer_config": run.optimizer_config,
            "optimizer_state": run.optimizer.state_dict(),
            "scheduler_state": {"schedule": run.config.schedule, "step": run.step, "lr": lr,
                                "steps_per_epoch": steps},
            "epoch": run.epochs_done, "step": run.step, "rng": rng_state(), "history": run.history,
            "config": run.config.to_dict(), "data": run.identity, "best_test_acc": run.best,
            "best_epoch": run.best_epoch, "device": str(run.device), "metadata": run.metadata,
            "threads": run.threads, "world_size": dist_.world_size(), "ranks": ranks,
            "tracker": run.tracker.state_dict() if run.tracker is not None else None}
