"""Checkpoints: the contract between training (often on a GPU) and analysis (anywhere).

A sharpscope checkpoint is a ``torch.save`` of a dict made only of tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)`` (no code runs on load):

========================  ===========================================================================
``format``                ``"sharpscope-checkpoint"``; ``format_version`` (currently 1)
``model_spec``            ``{"name", "num_classes", "kwargs"}`` for :func:`sharpscope.models.build_model`,
                          or None for a user model
``state_dict``            the model's parameters and buffers, on the CPU
``optimizer_config``      name, base optimizer and hyperparameters
``optimizer_state``       ``optimizer.state_dict()`` (base state: momentum, Adam moments, F-SAM's m)
``scheduler_state``       the learning-rate schedule and its position
``epoch`` / ``step``      completed epochs and optimizer steps
``rng``                   torch (CPU and CUDA), numpy and python RNG states
``history``               one dict per epoch (the rows of ``metrics.jsonl``)
``config``                the full training configuration (dataset names included)
``torch_version``, ``device``, ``sharpscope_version``, ``saved_at``
========================  ===========================================================================

Files are written atomically (temporary file + ``os.replace``): a process killed while saving
leaves the previous checkpoint intact. :func:`load_checkpoint` also accepts a bare ``state_dict``
(given ``model=`` or ``spec=``), a ``{"state_dict": ...}`` dict (PyTorch Lightning) and strips the
``module.`` (DDP), ``model.`` (Lightning) and ``_orig_mod.`` (``torch.compile``) prefixes.
"""

from __future__ import annotations

import os
import pickle
import random
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_output
from .._version import __version__
from ..errors import UserInputError
from ..models import build_model

FORMAT = "sharpscope-checkpoint"
FORMAT_VERSION = 1
_PREFIXES = ("module.", "model.", "_orig_mod.")


def to_cpu(obj: Any) -> Any:
    """Copy every tensor of a nested dict/list structure to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where a GPU is present)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically; ``payload`` gets the format fields and is moved to the CPU."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "torch_version": str(torch.__version__),
            "sharpscope_version": str(__version__), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    full.update(to_cpu(payload))
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"cannot write checkpoint {str(target)!r}: it is a directory")
    with atomic_output(target) as tmp:
        torch.save(full, tmp)
    return target


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the rebuilt model with the weights loaded, in eval mode (None only when a bare
            state_dict was loaded without ``model=``/``spec=``).
        spec: ``{"name", "num_classes", "kwargs"}`` or None.
        state_dict: the weights (prefixes stripped).
        history: per-epoch metrics (empty for a bare state_dict).
        optimizer_config: optimizer name and hyperparameters.
        epoch, step: training progress at save time.
        raw: the whole dict as stored (optimizer/scheduler/RNG states, config, versions).
    """

    path: Path
    model: nn.Module | None
    spec: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return self.raw.get("config", {})

    @property
    def optimizer_state(self) -> dict[str, Any] | None:
        return self.raw.get("optimizer_state")

    @property
    def scheduler_state(self) -> dict[str, Any] | None:
        return self.raw.get("scheduler_state")

    @property
    def rng(self) -> dict[str, Any] | None:
        return self.raw.get("rng")

    @property
    def is_bare(self) -> bool:
        """True when the file held only weights (no training state)."""
        return self.raw.get("format") != FORMAT


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove ``module.``/``model.``/``_orig_mod.`` when every key carries it (repeatedly, e.g. DDP of compile)."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _read(path: Path, map_location: Any) -> Any:
    if not path.exists():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise UserInputError(f"checkpoint {str(path)!r} is a directory; give a .pt file (e.g. {path}/last.pt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError,
            AttributeError, KeyError, IndexError) as exc:
        text = str(exc).strip()
        if "Weights only load failed" in text:
            raise UserInputError(f"{str(path)!r} holds Python objects that safe loading (weights_only=True) refuses, "
                                 f"e.g. a pickled model; save model.state_dict() instead") from None
        first_line = text.splitlines()[0] if text else ""
        # Some loader errors are bare numbers or keys ("105"); name the exception type then.
        reason = first_line if len(first_line) > 12 else f"{type(exc).__name__}: {first_line}".rstrip(": ")
        raise UserInputError(f"{str(path)!r} is not a readable checkpoint (truncated, corrupted or not a "
                             f"torch file): {reason[:200]}") from None


def _weights_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        weights = obj.get("state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        weights = obj["state_dict"]  # Lightning and many training scripts
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        weights = obj["model"]
    else:
        weights = obj
    if (not isinstance(weights, dict) or not weights
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        raise UserInputError(f"{str(path)!r} is a torch file but not a checkpoint: it holds no state_dict "
                             f"(a dict of parameter names to tensors)")
    return strip_prefixes(weights)


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line error naming what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the "
                         f"file, {tuple(own[k].shape)} in the model)")
        raise UserInputError(f"{where} does not fit {type(model).__name__}: {'; '.join(parts)} — "
                             f"is it for another architecture or number of classes?")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", model: nn.Module | None = None,
                    spec: dict[str, Any] | None = None) -> Checkpoint:
    """Load a checkpoint (or a bare ``state_dict``) safely and rebuild the model.

    Args:
        path: a ``.pt`` file written by ``sharpscope train``/:func:`sharpscope.train.fit`, or any
            ``torch.save`` of a ``state_dict`` (optionally under a ``"state_dict"`` key).
        map_location: where tensors go (``"cpu"`` loads a CUDA checkpoint on a machine without a GPU).
        model: load the weights into this module instead of rebuilding from the stored spec.
        spec: ``{"name", "num_classes", "kwargs"}`` to build the model for a bare ``state_dict``.

    Raises:
        UserInputError: missing, truncated or foreign file, or weights for another architecture.
    """
    path = Path(path)
    obj = _read(path, map_location)
    weights = _weights_of(obj, path)
    raw = obj if isinstance(obj, dict) and obj.get("format") == FORMAT else {}
    if raw and raw.get("format_version", 0) > FORMAT_VERSION:
        raise UserInputError(f"{str(path)!r} has checkpoint format {raw['format_version']}, newer than this "
                             f"sharpscope understands ({FORMAT_VERSION}); upgrade sharpscope")
    spec = spec if spec is not None else raw.get("model_spec")
    if model is None and spec is not None:
        try:
            model = build_model(spec["name"], int(spec["num_classes"]), **dict(spec.get("kwargs") or {}))
        except (KeyError, TypeError) as exc:
            raise UserInputError(f"model spec {spec!r} is malformed ({exc}); expected name, num_classes, kwargs") \
                from None
    if model is not None:
        load_state_into(model, weights, f"checkpoint {str(path)!r}")
        if isinstance(map_location, (str, torch.device)):
            model.to(torch.device(map_location))
        model.eval()
    elif raw:
        raise UserInputError(f"{str(path)!r} was saved from a user model (no model spec): pass model= to "
                             f"load_checkpoint")
    else:
        raise UserInputError(f"{str(path)!r} is a bare state_dict: pass model= (an nn.Module) or spec= "
                             f"({{'name', 'num_classes', 'kwargs'}}) to load_checkpoint")
    return Checkpoint(path=path, model=model, spec=spec, state_dict=weights, history=list(raw.get("history", [])),
                      optimizer_config=dict(raw.get("optimizer_config", {})), epoch=int(raw.get("epoch", 0)),
                      step=int(raw.get("step", 0)), raw=raw)
