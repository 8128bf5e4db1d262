"""``sharpscope train``: train a model zoo model on a dataset and write a run folder.

Precedence of settings: :class:`TrainConfig` defaults < ``--preset paper`` < explicit flags.
With ``--resume`` the run's stored configuration, model and dataset are used, and explicit flags
may override what does not change the weights (typically a larger ``--epochs``); another dataset or
a flag that changes the run (``--lr``, ``--optimizer``, ...) is refused. A run killed at any instant
resumes to the files of an uninterrupted run; a complete run is only checked and completed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..data import DATASET_NAMES, TensorData, canonical_dataset_name, load_dataset
from ..errors import UserInputError
from ..models import MODEL_NAMES, build_model, canonical_model_name
from .checkpoint import _build, load_checkpoint
from .config import (
    AMP_MODES,
    ASCENT_MODES,
    BASE_NAMES,
    MASK_RANK_MODES,
    OPTIMIZER_NAMES,
    PAPER_PRESET,
    SCHEDULES,
    TrainConfig,
)
from .layout import RunLayout
from .loop import fit
from .run_folder import RunFolder

# flag destination -> TrainConfig field (all default to None so that "not given" is visible).
_CONFIG_FLAGS = ("optimizer", "base", "lr", "momentum", "weight_decay", "rho", "percentile", "epochs", "batch_size",
                 "eval_batch_size", "schedule", "warmup_epochs", "step_size", "gamma", "label_smoothing", "grad_clip",
                 "seed", "device", "amp", "log_mask_every", "save_every", "accumulate", "ascent", "mask_ranks",
                 "dist_timeout", "track", "track_every", "track_samples", "log")
_SWITCHES = ("compile", "bn_bypass", "channels_last", "sync_bn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASET_NAMES)} (default: digits)")
    data.add_argument("--data-root", default=None, help="folder with the dataset files (default: $SHARPSCOPE_DATA "
                                                        "or ./data)")
    data.add_argument("--model", default=None, help=f"one of {', '.join(MODEL_NAMES)} (default: mlp for digits, "
                                                    f"resnet20 otherwise)")
    data.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                      help="no random crop/flip (default: the dataset's choice)")
    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--preset", choices=["paper"], default=None,
                     help="paper: ZSharp paper recipe (Adam 1e-3, wd 5e-5, warm-up 5, x0.75 every 30, batch 256, "
                          "200 epochs, seed 52); other flags override it")
    opt.add_argument("--optimizer", default=None, help=f"one of {', '.join(OPTIMIZER_NAMES)} (default: sgd)")
    opt.add_argument("--base", default=None, help=f"base optimizer of sam/asam/zsharp/fsam: {', '.join(BASE_NAMES)}")
    opt.add_argument("--lr", type=float, default=None, help="learning rate (default 0.1 for SGD, 1e-3 for Adam)")
    opt.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    opt.add_argument("--weight-decay", type=float, default=None, help="weight decay of the base optimizer (5e-4)")
    opt.add_argument("--rho", type=float, default=None, help="neighbourhood radius (sam/zsharp/fsam 0.05, asam 0.5)")
    opt.add_argument("--percentile", type=float, default=None, help="ZSharp: Z-score quantile kept above (0.95)")
    opt.add_argument("--bn-bypass", action="store_true", default=None,
                     help="freeze BatchNorm running statistics during the second (perturbed) pass")
    opt.add_argument("--grad-clip", type=float, default=None, help="clip the descent gradient to this L2 norm")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--epochs", type=int, default=None, help="total epochs (default 10)")
    sched.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    sched.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch size (default 1024)")
    sched.add_argument("--schedule", default=None, help=f"learning-rate schedule: {', '.join(SCHEDULES)}")
    sched.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length in epochs")
    sched.add_argument("--step-size", type=int, default=None, help="step schedule: epochs between decays (30)")
    sched.add_argument("--gamma", type=float, default=None, help="step schedule: decay factor (0.75)")
    sched.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (0)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order, augmentation (0)")
    run.add_argument("--device", default=None, help="auto (CUDA if available), cpu, cuda, cuda:N")
    run.add_argument("--amp", default=None, help=f"mixed precision: {', '.join(AMP_MODES)}")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    run.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    run.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<optimizer>-s<seed>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument("--log-mask-every", type=int, default=None, help="ZSharp: log mask statistics every N steps "
                                                                       "(50; 0 disables)")
    run.add_argument("--save-every", type=int, default=None, help="also keep epoch_XXXX.pt every N epochs")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    track = parser.add_argument_group("sharpness during training (sharpscope.track)")
    track.add_argument("--track", default=None, help="measures every --track-every steps, comma-separated: "
                       "lambda_max, preconditioned, trace, update_curvature, masks, zscores (default: none)")
    track.add_argument("--track-every", type=int, default=None, help="tracking period in optimizer steps (200)")
    track.add_argument("--track-samples", type=int, default=None,
                       help="probe examples: the first N training examples (512)")
    track.add_argument("--log", default=None, help="tracking loggers besides <out>/tracking.jsonl, comma-separated: "
                       "tensorboard, mlflow, wandb (pip install 'sharpscope[track]')")
    dist = parser.add_argument_group("several processes (torchrun --nproc_per_node N -m sharpscope train ...)")
    dist.add_argument("--accumulate", type=int, default=None,
                      help="split each batch into K micro-batches (one ascent, one descent per step; default 1)")
    dist.add_argument("--ascent", choices=ASCENT_MODES, default=None,
                      help="SAM family under DDP: local (each replica ascends with its own gradient, default) or "
                           "global (the all-reduced gradient: the ascent of one process on the whole batch)")
    dist.add_argument("--sync-bn", action="store_true", default=None, help="DDP: SyncBatchNorm (CUDA only)")
    dist.add_argument("--mask-ranks", choices=MASK_RANK_MODES, default=None,
                      help="ZSharp masks.csv under DDP with local ascent: reduce (one row per layer: counts summed, "
                           "norms and thresholds averaged over ranks; default) or per-rank (a row per rank)")
    dist.add_argument("--dist-timeout", type=float, default=None,
                      help="seconds a process waits for a dead or stuck peer before it stops (default 300)")


def model_kwargs(name: str, data: TensorData) -> dict[str, Any]:
    """Input-shape arguments a zoo model needs to fit ``data``."""
    c, h, w = data.image_shape
    if name == "mlp":
        return {"in_features": c * h * w}
    kwargs: dict[str, Any] = {"in_channels": c}
    if name == "vit":
        if h != w:
            raise UserInputError(f"vit needs square images, {data.name} has {h}x{w}")
        kwargs["image_size"] = h
    return kwargs


def _config_from(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    updates: dict[str, Any] = {}
    if args.preset == "paper":
        updates.update(PAPER_PRESET)
    for name in _CONFIG_FLAGS + _SWITCHES + ("augment",):
        value = getattr(args, name, None)
        if value is not None:
            updates[name] = value
    if args.quiet:
        updates["progress"] = False
    fields = {k: v for k, v in base.to_dict().items()}
    fields.update(updates)
    return TrainConfig.from_dict(fields).validate()


def _check_names(args: argparse.Namespace) -> None:
    """Names are case-insensitive (``--optimizer ZSharp``), as styles are; unknown ones are one line."""
    for attr, allowed in (("optimizer", OPTIMIZER_NAMES), ("base", BASE_NAMES), ("schedule", SCHEDULES),
                          ("amp", AMP_MODES)):
        value = getattr(args, attr)
        if value is None:
            continue
        if value.lower() not in allowed:
            raise UserInputError(f"unknown --{attr} {value!r}; choose one of: {', '.join(allowed)}")
        setattr(args, attr, value.lower())


def run(args: argparse.Namespace) -> int:
    """``sharpscope train``; under torchrun every process runs this, rank 0 alone prints and writes."""
    try:
        distributed.init_from_env(timeout_s=args.dist_timeout or TrainConfig.dist_timeout)
        return _run(args)
    except distributed.DistributedFailure as failure:
        print(f"sharpscope train: {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.destroy()


def _run(args: argparse.Namespace) -> int:
    _check_names(args)
    if args.resume:
        out, stored, epochs_done = _stored_run(args)
        dataset, data_root = _resumed_dataset(args, stored)
        config = _config_from(args, TrainConfig.from_dict(stored.get("config") or {}))
    else:
        epochs_done, dataset, data_root = 0, canonical_dataset_name(args.dataset or "digits"), args.data_root
        config = _config_from(args, TrainConfig())
        name = canonical_model_name(args.model or ("mlp" if dataset == "digits" else "resnet20"))
        out = _fresh_out(args, dataset, name, config)
    train_data = load_dataset(dataset, root=data_root, train=True)
    test_data = load_dataset(dataset, root=data_root, train=False)
    torch.manual_seed(config.seed)  # the initialisation is part of the run's seed
    if args.resume:
        model = _build(stored["model_spec"])
    else:
        model = build_model(name, train_data.num_classes, **model_kwargs(name, train_data))
    reporter = _reporter(args) if distributed.is_main() else None
    result = fit(model, train_data, test_data, config, out=out, resume=bool(args.resume), on_epoch=reporter,
                 metadata={"dataset": dataset, "data_root": str(data_root) if data_root is not None else None})
    if not distributed.is_main():
        return 0
    if epochs_done == config.epochs:
        print(f"sharpscope train: the run in {out} already had its {epochs_done} epochs; nothing trained, its files "
              f"were checked and completed", file=sys.stderr, flush=True)
    last = result.history[-1] if result.history else {}
    best = result.best_test_acc if result.best_test_acc is not None else float("nan")
    print(f"done: {config.optimizer} on {dataset}, {last.get('epoch', 0)} epochs, test acc "
          f"{last.get('test_acc', float('nan')):.4f} (best {best:.4f}); run folder {out}")
    return 0


def _stored_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any], int]:
    """``(run folder, stored run description, epochs done)`` from ``last.pt``, else from ``config.json``
    (a run killed before its first epoch was committed starts over)."""
    if args.out is None:
        raise UserInputError("--resume needs --out, the run folder holding last.pt")
    layout = RunLayout(args.out)
    if layout.folder.exists() and not layout.folder.is_dir():
        raise UserInputError(f"--out {str(layout.folder)!r} is a file; give a folder for the run")
    if layout.last.exists():
        ckpt = load_checkpoint(layout.last)
        stored, epochs_done = ckpt.raw, ckpt.epoch
    else:
        document = RunFolder(layout.folder).read_config()
        if document is None:
            raise UserInputError(f"nothing to resume: {str(layout.last)!r} does not exist")
        stored, epochs_done = document, 0
    if not isinstance(stored.get("model_spec"), dict):
        raise UserInputError(f"the run in {str(layout.folder)!r} has no model spec; resume it from Python with fit()")
    if args.model is not None and canonical_model_name(args.model) != stored["model_spec"].get("name"):
        raise UserInputError(f"--model {args.model} differs from the run's model {stored['model_spec'].get('name')}; "
                             f"drop --model")
    return layout.folder, stored, epochs_done


def _resumed_dataset(args: argparse.Namespace, stored: dict[str, Any]) -> tuple[str, Any]:
    """The run's dataset and data root (a ``--dataset`` other than the run's is refused before any loading)."""
    metadata = stored.get("metadata") or {}
    dataset = canonical_dataset_name(metadata.get("dataset") or "digits")
    if args.dataset is not None and canonical_dataset_name(args.dataset) != dataset:
        raise UserInputError(f"--dataset {args.dataset} differs from the run's dataset {dataset}; drop --dataset to "
                             f"resume (or start a new run in another --out)")
    return dataset, args.data_root or metadata.get("data_root")


def _fresh_out(args: argparse.Namespace, dataset: str, name: str, config: TrainConfig) -> Path:
    layout = RunLayout(args.out or f"runs/{dataset}-{name}-{config.optimizer}-s{config.seed}")
    if layout.folder.exists() and not layout.folder.is_dir():
        raise UserInputError(f"--out {str(layout.folder)!r} is a file; give a folder for the run")
    if layout.last.exists():  # fail before reading a large dataset
        raise UserInputError(f"--out {str(layout.folder)!r} already holds a run (last.pt); pass --resume to continue "
                             f"it or choose another folder")
    return layout.folder


def _reporter(args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    def report(row: dict[str, Any]) -> None:
        if not args.quiet:
            print(f"epoch {row['epoch']:>4}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}  "
                  f"{row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)

    return report
