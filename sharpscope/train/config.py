"""Training configuration: :class:`TrainConfig`, the paper preset and the optimizer factory."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._validate import choice, integer, number, positive_int, positive_number
from ..errors import UserInputError

OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "adamw", "sam", "asam", "zsharp", "fsam")
BASE_NAMES: tuple[str, ...] = ("sgd", "adam", "adamw")
SHARPNESS_AWARE: tuple[str, ...] = ("sam", "asam", "zsharp", "fsam")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
AMP_MODES: tuple[str, ...] = ("off", "bf16")
#: ``local``: each DDP replica ascends with its own pass-1 gradient; ``global``: the all-reduced one.
ASCENT_MODES: tuple[str, ...] = ("local", "global")
#: ZSharp mask statistics under DDP with local ascent: ``reduce`` (one row per layer) or ``per-rank``.
MASK_RANK_MODES: tuple[str, ...] = ("reduce", "per-rank")
#: rho when none is given: the defaults of the reference implementations (REFERENCE.md).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "zsharp": 0.05, "fsam": 0.05}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    The learning rate at optimizer step ``t`` (``e = t / steps_per_epoch`` epochs done) is
    ``lr * f(t)``: a linear warm-up ``f = (t + 1) / (warmup_epochs * steps_per_epoch)`` while
    ``e < warmup_epochs``, then ``constant`` f = 1, ``step`` f = gamma^floor((floor(e) - warmup) / step_size),
    or ``cosine`` f = (1 + cos(pi (e - warmup) / (epochs - warmup))) / 2.
    """

    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float | None = None  # None: 0.1 with an SGD base, 1e-3 with Adam/AdamW
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    rho: float | None = None  # None: DEFAULT_RHO[optimizer]
    percentile: float = 0.95
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. eta (ASAM), sigma/lmbda (F-SAM)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1024
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    step_size: int = 30
    gamma: float = 0.75
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max L2 norm of the descent gradient (g' for the SAM family)
    augment: bool | None = None  # None: the dataset's default (crop + flip for natural images)
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    channels_last: bool = False
    bn_bypass: bool = False  # SAM family: BatchNorm running stats frozen during the second pass
    log_mask_every: int = 50  # ZSharp: mask statistics every this many steps (0: never)
    save_every: int = 0  # also keep epoch_XXXX.pt every this many epochs (0: never)
    progress: bool = True
    accumulate: int = 1  # micro-batches per optimizer step (the batch is split; same maths, less memory)
    ascent: str = "local"  # SAM family under DDP: local (per replica, m-sharpness) or global (all-reduced)
    sync_bn: bool = False  # DDP: convert BatchNorm to SyncBatchNorm (needs CUDA/NCCL)
    mask_ranks: str = "reduce"  # DDP + local ascent: masks.csv rows reduced over ranks, or per rank
    dist_timeout: float = 300.0  # seconds a rank waits for a dead or stuck peer before it stops
    track: str = ""  # measures tracked during training (sharpscope.track), e.g. "lambda_max,masks"; "" = off
    track_every: int = 200  # tracking period in optimizer steps
    track_samples: int = 512  # probe examples (the first training examples)
    log: str = ""  # tracking loggers besides <run>/tracking.jsonl: tensorboard, mlflow, wandb

    @property
    def base_lr(self) -> float:
        return float(self.lr) if self.lr is not None else (0.1 if self.base_name == "sgd" else 1e-3)

    @property
    def base_name(self) -> str:
        """The optimizer doing the descent (the base of a SAM-family method, else the optimizer itself)."""
        return self.base if self.optimizer in SHARPNESS_AWARE else self.optimizer

    @property
    def effective_rho(self) -> float | None:
        if self.optimizer not in SHARPNESS_AWARE:
            return None
        return float(self.rho) if self.rho is not None else DEFAULT_RHO[self.optimizer]

    def validate(self) -> TrainConfig:
        """Raise :class:`UserInputError` naming the first bad field (one line)."""
        choice(self.optimizer, "optimizer", OPTIMIZER_NAMES)
        choice(self.base, "base optimizer", BASE_NAMES)
        choice(self.schedule, "schedule", SCHEDULES)
        choice(self.amp, "amp mode", AMP_MODES)
        choice(self.ascent, "ascent", ASCENT_MODES)
        choice(self.mask_ranks, "mask_ranks", MASK_RANK_MODES)
        positive_int(self.accumulate, "accumulate")
        positive_number(self.dist_timeout, "dist_timeout")
        positive_number(self.base_lr, "lr")
        number(self.weight_decay, "weight_decay", minimum=0.0)
        number(self.momentum, "momentum", minimum=0.0)
        if self.momentum >= 1:
            raise UserInputError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.rho is not None:
            positive_number(self.rho, "rho")
        if not 0 < number(self.percentile, "percentile") < 1:
            raise UserInputError(f"percentile must be in (0, 1), e.g. 0.95; got {self.percentile}")
        for name in ("epochs", "batch_size", "eval_batch_size", "step_size"):
            positive_int(getattr(self, name), name)
        for name in ("log_mask_every", "save_every"):
            integer(getattr(self, name), name, minimum=0)
        integer(self.seed, "seed", minimum=None)
        number(self.warmup_epochs, "warmup_epochs", minimum=0.0)
        number(self.gamma, "gamma", minimum=0.0, maximum=1.0, strict_minimum=True)
        if not 0 <= number(self.label_smoothing, "label_smoothing", minimum=0.0) < 1:
            raise UserInputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None:
            positive_number(self.grad_clip, "grad_clip")
        self._validate_tracking()
        return self

    def _validate_tracking(self) -> None:
        from ..track.registry import LOGGERS, MEASURES
        from ..track.run import parse_names

        measures = parse_names(self.track, MEASURES, "--track measure")
        parse_names(self.log, LOGGERS, "--log logger")
        positive_int(self.track_every, "track_every")
        positive_int(self.track_samples, "track_samples")
        if self.log and not measures:
            raise UserInputError("--log names tracking loggers but --track names no measure; add --track lambda_max")
        if "masks" in measures and self.optimizer != "zsharp":
            raise UserInputError(f"--track masks reads ZSharp's filter statistics; the optimizer is {self.optimizer}: "
                                 "drop masks or use --optimizer zsharp")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)


#: Fields a resumed run may change: they do not change the weights it computes (they set its length,
#: where and how fast it runs, and what it logs or keeps). Every other field defines the run.
RESUMABLE_FIELDS: tuple[str, ...] = ("epochs", "eval_batch_size", "device", "compile", "channels_last",
                                     "log_mask_every", "save_every", "progress", "mask_ranks", "dist_timeout",
                                     "track", "track_every", "track_samples", "log")


def _defining(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    values["lr"], values["rho"] = config.base_lr, config.effective_rho  # None means the default value
    return {k: v for k, v in values.items() if k not in RESUMABLE_FIELDS}


def resume_conflicts(stored: dict[str, Any], current: TrainConfig) -> list[str]:
    """``"lr (run: 0.05, now: 0.1)"`` for every run-defining field where ``current`` differs from ``stored``.

    Raises:
        UserInputError: ``stored`` is not a training configuration.
    """
    try:
        old = _defining(TrainConfig.from_dict(stored))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UserInputError(f"the stored training configuration is malformed ({exc})") from None
    new = _defining(current)
    return [f"{k} (run: {old[k]!r}, now: {new[k]!r})" for k in new if old.get(k) != new[k]]


#: The recipe of the ZSharp paper's code (REFERENCE.md, "Training recipe"). Augmentation follows the dataset:
#: crop + flip + normalisation for CIFAR/Tiny-ImageNet (as in the paper), none for 8x8 digits.
PAPER_PRESET: dict[str, Any] = {
    "optimizer": "zsharp", "base": "adam", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 5e-5, "rho": 0.05,
    "percentile": 0.95, "batch_size": 256, "eval_batch_size": 1024, "epochs": 200, "schedule": "step",
    "warmup_epochs": 5.0, "step_size": 30, "gamma": 0.75, "label_smoothing": 0.0, "augment": None, "amp": "off",
    "seed": 52, "bn_bypass": False,
}


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (see :class:`TrainConfig`)."""
    epochs_done = step / steps_per_epoch
    warm = config.warmup_epochs
    if warm > 0 and epochs_done < warm:
        return min(1.0, (step + 1) / (warm * steps_per_epoch))
    if config.schedule == "step":
        return config.gamma ** ((step // steps_per_epoch - int(math.ceil(warm))) // config.step_size)
    if config.schedule == "cosine":
        span = max(config.epochs - warm, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epochs_done - warm) / span)))
    return 1.0


def _base_class_and_kwargs(config: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    name = config.base_name
    if name == "sgd":
        return torch.optim.SGD, {"lr": config.base_lr, "momentum": config.momentum,
                                 "weight_decay": config.weight_decay}
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls, {"lr": config.base_lr, "betas": tuple(config.betas), "weight_decay": config.weight_decay}


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The optimizer for ``model``'s trainable parameters and its description for the checkpoint."""
    base_cls, base_kwargs = _base_class_and_kwargs(config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserInputError("the model has no trainable parameters (requires_grad is False everywhere)")
    description: dict[str, Any] = {"name": config.optimizer, "base": config.base_name, **base_kwargs}
    description["betas"] = list(base_kwargs["betas"]) if "betas" in base_kwargs else None
    if config.optimizer not in SHARPNESS_AWARE:
        return base_cls([p for _, p in named], **base_kwargs), description
    from .. import optim as sam_family  # imported here: only SAM-family runs need it

    cls = {"sam": sam_family.SAM, "asam": sam_family.ASAM, "zsharp": sam_family.ZSharp,
           "fsam": sam_family.FriendlySAM}[config.optimizer]
    extra = dict(config.optimizer_kwargs)
    if config.optimizer == "zsharp":
        extra.setdefault("percentile", config.percentile)
    description.update(rho=config.effective_rho, **extra)
    try:
        optimizer = cls(named, base_cls, rho=config.effective_rho, **extra, **base_kwargs)
    except TypeError as exc:
        raise UserInputError(f"bad optimizer_kwargs for {config.optimizer}: {exc}") from None
    return optimizer, description
