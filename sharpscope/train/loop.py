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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write_text
from .._progress import progress
from ..data.dataset import TensorData
from ..errors import UserInputError
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import SHARPNESS_AWARE, TrainConfig, build_optimizer, lr_factor
from .metrics import MASKS_FILE, METRICS_FILE, MaskLog, write_metrics


class TrainingDiverged(UserInputError):
    """The training loss became NaN or infinite (usually: learning rate or rho too large)."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (in train mode) and the logs."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_test_acc: float | None
    out: Path | None
    masks: pd.DataFrame = field(default_factory=pd.DataFrame)

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


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, batch_size: int = 1024, device: torch.device | None = None,
             amp: str = "off", channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (eval mode inside, train flag restored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for x, y in data.batches(batch_size, shuffle=False, augment=False, device=device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = max(len(data), 1)
    return float(loss_sum) / n, float(correct) / n


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
    """

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 config: TrainConfig, device: torch.device) -> None:
        self.model, self.forward, self.optimizer, self.config, self.device = model, forward, optimizer, config, device
        self.two_pass = config.optimizer in SHARPNESS_AWARE
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.two_pass and config.bn_bypass:
            from ..optim.bn import frozen_running_stats
            self.second_pass_context = lambda: frozen_running_stats(model)
        else:
            self.second_pass_context = contextlib.nullcontext

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(self.device, self.config.amp):
            out = self.forward(x)
        return F.cross_entropy(out.float(), y, label_smoothing=self.config.label_smoothing), out

    def _clip(self) -> None:
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, log_masks: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame | None]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, out = self._loss(x, y)
        loss.backward()
        masks = None
        if not self.two_pass:
            self._clip()
            self.optimizer.step()
            return loss.detach(), out.detach(), masks
        self.optimizer.first_step(zero_grad=True)
        if log_masks:
            masks = self.optimizer.mask_stats
        with self.second_pass_context():
            loss2, _ = self._loss(x, y)
        loss2.backward()
        self._clip()  # clipping g (before the ascent) would do nothing: e is normalised
        self.optimizer.second_step(zero_grad=True)
        return loss.detach(), out.detach(), masks


def _prepare_out(out: Path | None, resume: bool | str | Path) -> Path | None:
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {str(out)!r} is a file; give a folder for the run")
    if not resume and (out / "last.pt").exists():
        raise UserInputError(f"--out {str(out)!r} already holds a run (last.pt); pass --resume to continue it "
                             f"or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def fit(model: nn.Module, train_data: TensorData, test_data: TensorData | None = None,
        config: TrainConfig | None = None, *, out: str | Path | None = None, resume: bool | str | Path = False,
        spec: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        **overrides: Any) -> FitResult:
    """Train ``model`` on ``train_data``, evaluating on ``test_data`` after every epoch.

    Args:
        model: any classifier ``nn.Module`` (logits out); trained in place.
        train_data, test_data: :class:`sharpscope.data.TensorData` splits (test is optional).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
            (``fit(model, train, test, optimizer="zsharp", epochs=5)``).
        out: run folder for ``last.pt``, ``best.pt``, ``epoch_XXXX.pt``, ``metrics.jsonl``, ``masks.csv``
            and ``config.json``; None keeps everything in memory.
        resume: True continues from ``out/last.pt``; a path continues from that checkpoint. Training
            then runs up to ``config.epochs`` in total.
        spec: model spec stored in checkpoints (default: ``model.sharpscope_spec`` set by
            :func:`sharpscope.models.build_model`), so :func:`sharpscope.load_checkpoint` can rebuild it.
        metadata: JSON-able facts about the run stored in checkpoints and ``config.json`` (e.g. dataset root).
        on_epoch: called with each epoch's metrics row after its checkpoint is written.

    Returns:
        :class:`FitResult` with the model, the per-epoch history and the mask statistics.

    Raises:
        UserInputError: bad configuration or run folder; :class:`TrainingDiverged` on a non-finite loss.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    if len(train_data) == 0:
        raise UserInputError("the training data is empty")
    device = resolve_device(config.device)
    spec = spec if spec is not None else getattr(model, "sharpscope_spec", None)
    if spec is not None and spec.get("num_classes") not in (None, train_data.num_classes):
        raise UserInputError(f"the model has {spec['num_classes']} outputs but {train_data.name} has "
                             f"{train_data.num_classes} classes")
    out_dir = _prepare_out(Path(out) if out is not None else None, resume)
    torch.manual_seed(config.seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, optimizer_config = build_optimizer(model, config)

    history: list[dict[str, Any]] = []
    start_epoch, step, best = 0, 0, None
    masks = MaskLog(out_dir / MASKS_FILE if out_dir is not None else None)
    if resume:
        source = out_dir / "last.pt" if resume is True and out_dir is not None else Path(str(resume))
        if resume is True and out_dir is None:
            raise UserInputError("resume=True needs out= (the run folder holding last.pt)")
        ckpt = load_checkpoint(source, map_location=device, model=model)
        if ckpt.is_bare:
            raise UserInputError(f"{str(source)!r} holds only weights; resuming needs a checkpoint written by fit")
        saved = ckpt.optimizer_config
        if (saved.get("name"), saved.get("base")) != (optimizer_config["name"], optimizer_config["base"]):
            raise UserInputError(f"{str(source)!r} was trained with {saved.get('name')}/{saved.get('base')}, not "
                                 f"{optimizer_config['name']}/{optimizer_config['base']}; resume with the same optimizer")
        optimizer.load_state_dict(ckpt.optimizer_state)
        start_epoch, step, history = ckpt.epoch, ckpt.step, list(ckpt.history)
        best = ckpt.raw.get("best_test_acc")
        set_rng_state(ckpt.rng)
        masks.load(up_to_step=step)
        model.train()
        if start_epoch >= config.epochs:
            raise UserInputError(f"{str(source)!r} already has {start_epoch} epochs; pass more --epochs to continue")

    if device.type == "cuda":  # keep the uint8 images in device memory, augment there
        train_data = train_data.to(device)
        test_data = test_data.to(device) if test_data is not None else None
    forward = torch.compile(model) if config.compile else model
    stepper = TrainStep(model, forward, optimizer, config, device)
    steps_per_epoch = train_data.num_batches(config.batch_size)
    identity = {"train": train_data.name, "test": test_data.name if test_data is not None else None,
                "train_size": len(train_data), "num_classes": train_data.num_classes}
    if out_dir is not None:
        atomic_write_text(out_dir / "config.json", json.dumps(
            {"config": config.to_dict(), "model_spec": spec, "optimizer": optimizer_config, "data": identity,
             "metadata": metadata or {}},
            indent=2, default=str))

    model.train()
    for epoch in range(start_epoch, config.epochs):
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        batches = train_data.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                     augment=config.augment, device=device)
        bar = progress(batches, enabled=config.progress, total=steps_per_epoch,
                       desc=f"epoch {epoch + 1}/{config.epochs}")
        lr = config.base_lr
        for i, (x, y) in enumerate(bar):
            lr = config.base_lr * lr_factor(config, step, steps_per_epoch)
            _set_lr(optimizer, lr)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            log_masks = (config.optimizer == "zsharp" and config.log_mask_every > 0
                         and step % config.log_mask_every == 0)
            loss, logits, stats = stepper(x, y, log_masks)
            if stats is not None:
                masks.add(step, epoch, stats)
            loss_sum += loss.double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            if config.progress and hasattr(bar, "set_postfix") and (i % 20 == 0 or i == steps_per_epoch - 1):
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{float(correct) / seen:.3f}",
                                img_s=f"{seen / elapsed:.0f}", refresh=False)
        train_loss, train_acc = float(loss_sum) / seen, float(correct) / seen  # synchronises the device
        train_time = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training diverged: non-finite train loss in epoch {epoch + 1}; lower --lr "
                                   f"(now {config.base_lr}) or --rho; the last good checkpoint is kept")
        test_loss = test_acc = float("nan")
        if test_data is not None:
            test_loss, test_acc = evaluate(forward, test_data, config.eval_batch_size, device, config.amp,
                                           config.channels_last)
        history.append({"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                        "test_loss": test_loss, "test_acc": test_acc, "time_s": time.perf_counter() - start,
                        "images_per_s": seen / max(train_time, 1e-9)})
        score = test_acc if test_data is not None else train_acc
        improved = best is None or score > best
        best = score if improved else best
        if out_dir is not None:
            payload = {"model_spec": spec, "state_dict": model.state_dict(), "optimizer_config": optimizer_config,
                       "optimizer_state": optimizer.state_dict(),
                       "scheduler_state": {"schedule": config.schedule, "step": step, "lr": lr,
                                           "steps_per_epoch": steps_per_epoch},
                       "epoch": epoch + 1, "step": step, "rng": rng_state(), "history": history,
                       "config": config.to_dict(), "data": identity, "best_test_acc": best,
                       "device": str(device), "metadata": metadata or {}}
            write_metrics(out_dir / METRICS_FILE, history)
            masks.write()
            save_checkpoint(out_dir / "last.pt", payload)
            if improved:
                save_checkpoint(out_dir / "best.pt", payload)
            if config.save_every and (epoch + 1) % config.save_every == 0:
                save_checkpoint(out_dir / f"epoch_{epoch + 1:04d}.pt", payload)
        if on_epoch is not None:
            on_epoch(history[-1])
    return FitResult(model=model, history=history, best_test_acc=best if test_data is not None else None,
                     out=out_dir, masks=masks.frame())
