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
``best_test_acc``         the best score so far; ``best_epoch`` the epoch that reached it
``data``, ``metadata``    the training data's identity (names, size, classes) and facts about the run
``digest``                ``{"algorithm": "sha256", "tensors": hex}``: SHA-256 of every tensor above (its
                          path, dtype, shape and bytes, in order); absent in files of sharpscope 0.1
``torch_version``, ``device``, ``sharpscope_version``, ``saved_at``
========================  ===========================================================================

Files are serialised in memory, then written atomically (temporary file + ``os.replace``): a
process killed while saving leaves the previous checkpoint intact, and a full disk raises an
``OSError`` naming the file. On load, the zip archive's CRC-32s and the tensor digest are checked
(``torch.load`` checks neither), so a flipped bit is refused instead of analysed; the fields are
checked for their types; a FIFO or device is refused before it is opened.

Checkpoints written by other tools (:func:`load_checkpoint` with ``model=`` or ``spec=`` says which
architecture they hold; :attr:`Checkpoint.source_format` says which kind was recognised):

=====================  ======================================================================================
``state_dict``         ``torch.save(model.state_dict())``; DDP scripts (every key under ``module.``),
                       ``torch.compile`` (``_orig_mod.``) and a LightningModule's own state_dict (``model.``,
                       as the official ZSharp code writes ``weights/<run>.pth``)
``lightning``          a PyTorch Lightning ``.ckpt``: ``{"state_dict": {"model.…": …}, "epoch", "pytorch-lightning_version",
                       ...}``
``timm``               ``{"state_dict", "state_dict_ema"?, "arch", "args", ...}`` (the training weights; the EMA
                       weights only when there are no others)
``training-script``    ``{"net" | "model" | "model_state_dict" | "state_dict": weights, "acc", "epoch", ...}``
                       (the common CIFAR training scripts)
``safetensors``        ``safetensors.torch.save_file``/``save_model`` (``pip install safetensors``)
``huggingface``        a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, sharded or
                       ``pytorch_model.bin``); without ``model=`` it is rebuilt with ``transformers``, offline
=====================  ======================================================================================

A prefix is removed only when *every* key carries it; given a model, the shared leading component of
the keys is removed until they match the model's (a LightningModule that calls its network ``net``).
Objects other than tensors that such files pickle beside the weights (``argparse.Namespace`` arguments,
numpy scalars, a scheduler) are read as inert placeholders, never executed; a file whose weights
exist only inside a pickled module is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import stat
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes
from .._validate import integer, number
from .._version import __version__
from ..errors import UserInputError
from ..models import build_model

FORMAT = "sharpscope-checkpoint"
FORMAT_VERSION = 1
DIGEST_KEY = "digest"
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: Keys under which training scripts store the weights, in the order they are preferred (timm's EMA copy last).
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "state_dict_ema", "model_ema")
#: The weight files of a Hugging Face ``save_pretrained`` folder, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


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


def _tensors(obj: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested dict/list structure with its path, in a fixed (insertion) order."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{name}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{name}/{i}")


def tensor_digest(obj: Any) -> str:
    """SHA-256 of every tensor in ``obj``: its path, dtype, shape and raw bytes, in traversal order.

    A key named ``"digest"`` at the top level is left out (it holds this value in a checkpoint).
    """
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    digest = hashlib.sha256()
    for name, tensor in _tensors(obj):
        t = tensor.detach()
        t = (t.to_dense() if t.layout != torch.strided else t).cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file: ``payload`` on the CPU, the format fields and a tensor digest."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "torch_version": str(torch.__version__),
            "sharpscope_version": str(__version__), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    full.update(to_cpu(payload))
    full[DIGEST_KEY] = {"algorithm": "sha256", "tensors": tensor_digest(full)}
    buffer = io.BytesIO()
    torch.save(full, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically; ``payload`` gets the format fields and is moved to the CPU.

    The file is serialised in memory first, so a full disk raises an ``OSError`` naming ``path``
    (not a torch error) and leaves the previous file in place.
    """
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"cannot write checkpoint {str(target)!r}: it is a directory")
    atomic_write_bytes(target, checkpoint_bytes(payload))
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
    source_format: str = FORMAT

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


class MissingModelError(UserInputError):
    """A file of weights only (no architecture) loaded without ``model=`` or ``spec=``.

    ``path`` is the file; the command line catches this to say which flags name the model.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


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


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing what is not a regular file before ``open`` could block on it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserInputError(f"checkpoint {str(path)!r} does not exist") from None
    except OSError as exc:
        raise UserInputError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UserInputError(f"checkpoint {str(path)!r} is a directory; give a .pt file (e.g. {path}/last.pt) "
                             f"or a Hugging Face save_pretrained folder (config.json and model.safetensors)")
    if not stat.S_ISREG(mode):
        raise UserInputError(f"checkpoint {str(path)!r} is not a regular file (a FIFO, socket or device); "
                             f"give a .pt file")
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by the caller)
    except OSError as exc:
        raise UserInputError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}") from None


def _check_archive(handle: BinaryIO, path: Path) -> None:
    """Check the CRC-32 of every member of a zip checkpoint (``torch.load`` does not)."""
    if not zipfile.is_zipfile(handle):
        handle.seek(0)
        _check_legacy_torch_file(handle.read(64), path)
        return  # a legacy (pre-zip) torch file: torch.load decides
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError) as exc:
        raise UserInputError(f"{str(path)!r} is not a readable checkpoint (truncated, corrupted or not a "
                             f"torch file): {_first_line(exc)}") from None
    if bad is not None:
        raise UserInputError(f"{str(path)!r} is corrupted: archive member {bad!r} fails its CRC check (the bytes "
                             f"changed after saving); use another copy of the checkpoint")


def _check_legacy_torch_file(head: bytes, path: Path) -> None:
    """A file that is neither a zip nor a pickle (legacy ``torch.save``) is not a checkpoint: say what it looks like."""
    if head.startswith(b"\x80"):
        return
    if head.startswith(b"PK\x03\x04"):
        raise UserInputError(f"{str(path)!r} is not a readable checkpoint (truncated or corrupted: its zip archive "
                             f"is incomplete); use another copy of the checkpoint")
    text = head.lstrip()
    looks = ("JSON" if text[:1] in (b"{", b"[") else "an empty file" if not head
             else "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "some other binary format")
    raise UserInputError(f"{str(path)!r} is not a torch checkpoint (it looks like {looks}); give a .pt file "
                         f"written by sharpscope train or torch.save")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else ""
    # Some loader errors are bare numbers or keys ("105"); name the exception type then.
    return (first_line if len(first_line) > 12 else f"{type(exc).__name__}: {first_line}".rstrip(": "))[:200]


def _read(path: Path, map_location: Any) -> Any:
    with _open_regular(path) as handle:
        if _is_safetensors(handle):
            return _read_safetensors(path)
        handle.seek(0)
        _check_archive(handle, path)
        handle.seek(0)
        try:
            return torch.load(handle, map_location=map_location, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError,
                AttributeError, KeyError, IndexError) as exc:
            if "Weights only load failed" in str(exc):
                handle.seek(0)
                return _read_with_placeholders(handle, path, map_location)
            raise UserInputError(f"{str(path)!r} is not a readable checkpoint (truncated, corrupted or not a "
                                 f"torch file): {_first_line(exc)}") from None


class Opaque:
    """An object a foreign checkpoint pickled beside its weights (``argparse.Namespace``, a numpy scalar, a
    scheduler holding its optimizer), read without running any of its code: ``name`` is the global it stood
    for, ``args`` its constructor arguments, ``state`` its pickled state, ``items`` what was stored in it."""

    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass (defaultdict, AttributeDict)
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # a list subclass
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"Opaque({self.name})"


def _read_with_placeholders(handle: BinaryIO, path: Path, map_location: Any) -> Any:
    """Load a file that pickles other objects beside its tensors, still with ``weights_only=True``: each global
    the safe loader refuses (``torch.serialization.get_unsafe_globals_in_checkpoint``) is allowed for this one
    load as an inert :class:`Opaque` stand-in of that name (``torch.serialization.safe_globals``), so the
    file's own code never runs."""
    refused = UserInputError(f"{str(path)!r} holds Python objects that safe loading (weights_only=True) refuses, "
                             f"e.g. a pickled model; save model.state_dict() instead")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(handle)
        handle.seek(0)
        stand_ins = [(type("Opaque", (Opaque,), {"name": name}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(handle, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 (any failure of the tolerant reading is the refusal above)
        raise refused from None
    if not isinstance(obj, dict) or _find_weights(obj)[0] is None:
        raise refused  # e.g. torch.save(model): the weights live inside a pickled module
    return obj


def _is_safetensors(handle: BinaryIO) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON.

    The length is not compared with the file size, so that a truncated file is named as such.
    """
    head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserInputError(f"{str(path)!r} is a safetensors file: pip install safetensors to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupted): "
                             f"{_first_line(exc)}") from None


def _verify_digest(raw: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose tensors no longer match the digest stored at save time (absent before 0.2)."""
    stored = raw.get(DIGEST_KEY)
    if stored is None:
        return
    if stored.get("algorithm") != "sha256":
        raise UserInputError(f"{str(path)!r} has a digest of unknown algorithm {stored.get('algorithm')!r}; "
                             f"upgrade sharpscope")
    if tensor_digest(raw) != stored.get("tensors"):
        raise UserInputError(f"{str(path)!r} is corrupted: its tensors do not match the SHA-256 digest stored in "
                             f"it (the bytes changed after saving); use another copy of the checkpoint")


def _check_fields(raw: dict[str, Any], path: Path) -> None:
    """Validate the fields of a sharpscope checkpoint (types a hand-edited or foreign file may break)."""
    def kinds(key: str, allowed: tuple[type, ...], what: str) -> None:
        value = raw.get(key)
        if value is not None and not isinstance(value, allowed):
            raise UserInputError(f"{key} must be {what}; got {type(value).__name__} {value!r:.60}")

    try:
        for key in ("format_version", "epoch", "step"):
            if key in raw:
                integer(raw[key], key, minimum=0)
        for key in ("optimizer_config", "config", "optimizer_state", "scheduler_state", "rng", "data", "metadata",
                    DIGEST_KEY, "model_spec"):
            kinds(key, (dict,), "a dict")
        kinds("history", (list,), "a list of per-epoch dicts")
        if not all(isinstance(row, dict) for row in raw.get("history") or []):
            raise UserInputError("history must be a list of per-epoch dicts")
        if raw.get("best_test_acc") is not None:
            number(raw["best_test_acc"], "best_test_acc")
        if raw.get("best_epoch") is not None:
            integer(raw["best_epoch"], "best_epoch", minimum=0)
        if raw.get("model_spec") is not None:
            _check_spec(raw["model_spec"])
    except UserInputError as exc:
        raise UserInputError(f"{str(path)!r} has a malformed field: {exc} (the file was edited or not written by "
                             f"sharpscope)") from None


def _check_spec(spec: dict[str, Any]) -> None:
    if not isinstance(spec.get("name"), str):
        raise UserInputError(f"model_spec name must be a string; got {spec.get('name')!r}")
    integer(spec.get("num_classes"), "model_spec num_classes")
    if not isinstance(spec.get("kwargs") or {}, dict):
        raise UserInputError(f"model_spec kwargs must be a dict; got {spec.get('kwargs')!r:.60}")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _find_weights(obj: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``(weights, source format)`` of a loaded file (see the module docstring), ``(None, "")`` if it holds none."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        weights = obj.get("state_dict")
        return (weights, FORMAT) if isinstance(weights, dict) else (None, "")
    if _is_state_dict(obj):
        return obj, "state_dict"
    if not isinstance(obj, dict):
        return None, ""
    for key in _WEIGHT_KEYS:
        if _is_state_dict(obj.get(key)):
            return obj[key], _container_format(obj, key)
    return None, ""


def _container_format(obj: dict[str, Any], key: str) -> str:
    if "pytorch-lightning_version" in obj:
        return "lightning"
    if key == "state_dict_ema" or "arch" in obj or "state_dict_ema" in obj:
        return "timm"
    return "training-script"


def _weights_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights as stored (prefixes kept: :func:`fit_keys` or :func:`strip_prefixes` decide) and their format."""
    weights, source = _find_weights(obj)
    if weights is None or not _is_state_dict(weights):
        raise UserInputError(f"{str(path)!r} is a torch file but not a checkpoint: it holds no state_dict "
                             f"(a dict of parameter names to tensors)")
    return weights, source


def _shared_first_component(keys: list[str]) -> str | None:
    """The ``first.`` component every key starts with (and has more after), else None."""
    first = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    if len(first) != 1 or not all("." in k for k in keys):
        return None
    return first.pop()


def fit_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with the leading component shared by *all* its keys removed until its keys fit ``model``.

    The keys as stored are tried first (a model whose own keys all start with ``model.`` keeps them), then
    with one shared component removed at a time: ``module.`` (DDP), ``model.`` (Lightning), ``_orig_mod.``
    (``torch.compile``), or ``net.`` of a LightningModule holding its network as ``self.net``. Tensors the
    model ties to another (``lm_head.weight`` = the embedding) may be absent. When nothing fits, the
    :func:`strip_prefixes` form is returned (the mismatch is then reported by :func:`load_state_into`).
    """
    wanted = list(model.state_dict())
    ties = _tied_groups(model)
    candidate = state_dict
    while candidate:
        if set(candidate) <= set(wanted) and not _absent(wanted, candidate, ties):
            return candidate
        prefix = _shared_first_component(list(candidate))
        if prefix is None:
            break
        candidate = {k[len(prefix):]: v for k, v in candidate.items()}
    return strip_prefixes(state_dict)


def _tied_groups(model: nn.Module) -> dict[str, frozenset[str]]:
    """Key -> every key of the same tensor, for tensors the model ties (``lm_head.weight`` = the embedding).

    A file may hold any one name of a tied tensor (``save_pretrained`` and ``safetensors.save_model`` drop
    the others).
    """
    groups: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type != "meta" and tensor.numel() > 0:
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(ident, set()).add(key)
    return {key: frozenset(keys) for keys in groups.values() if len(keys) > 1 for key in keys}


def _absent(wanted: list[str], state_dict: dict[str, Any], ties: dict[str, frozenset[str]]) -> list[str]:
    """The model's keys the file lacks, a tied key counting as present when any name of its tensor is."""
    return [k for k in wanted if k not in state_dict and not any(t in state_dict for t in ties.get(k, ()))]


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``model.load_state_dict(strict=True)`` with a one-line error naming what does not match.

    Keys are fitted first (:func:`fit_keys`; the fitted dict is returned); a tied tensor the file leaves out
    is loaded through its twin.
    """
    state_dict = fit_keys(state_dict, model)
    own = model.state_dict()
    missing = _absent(list(own), state_dict, _tied_groups(model))
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        raise UserInputError(f"{where} does not fit {type(model).__name__}: "
                             f"{_mismatch(state_dict, own, missing, unexpected, wrong)}")
    model.load_state_dict(state_dict, strict=not (set(own) - set(state_dict)))
    return state_dict


def _mismatch(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor], missing: list[str],
              unexpected: list[str], wrong: list[str]) -> str:
    """What does not match, a few keys of each side, and what to do (one line)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the "
                     f"file, {tuple(own[k].shape)} in the model)")
    file_keys, model_keys = ", ".join(list(state_dict)[:3]), ", ".join(list(own)[:3])
    return (f"{'; '.join(parts)} (file keys: {file_keys}, ...; model keys: {model_keys}, ...) — is it for "
            f"another architecture, size or number of classes? Give the model it was saved from")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by Hugging Face ``save_pretrained`` (``config.json`` and a weight file)."""
    folder = Path(path)
    return (folder.is_dir() and (folder / "config.json").is_file()
            and any((folder / name).is_file() for name in HF_WEIGHT_FILES))


def _read_hf_folder(folder: Path, map_location: Any) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` folder (one file, or the shards its index names)."""
    import json

    for name in HF_WEIGHT_FILES:
        index = folder / name
        if not index.is_file():
            continue
        if not name.endswith(".index.json"):
            return _weights_of(_read(index, map_location), index)[0]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserInputError(f"{str(index)!r} is not a readable shard index: {_first_line(exc)}") from None
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(_weights_of(_read(folder / shard, map_location), folder / shard)[0])
        return weights
    raise UserInputError(f"{str(folder)!r} holds no weight file ({', '.join(HF_WEIGHT_FILES)})")


def _load_hf_folder(folder: Path, map_location: Any) -> Checkpoint:
    """A ``save_pretrained`` folder rebuilt by transformers itself (it knows the tied and renamed weights)."""
    from ..models.hf import hf_model

    model = hf_model(folder)
    if isinstance(map_location, (str, torch.device)):
        model.to(torch.device(map_location))
    return Checkpoint(path=folder, model=model, spec=None, state_dict=model.state_dict(), raw={},
                      source_format="huggingface")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", model: nn.Module | None = None,
                    spec: dict[str, Any] | None = None) -> Checkpoint:
    """Load a checkpoint (or a foreign file of weights) safely and rebuild the model.

    Args:
        path: a ``.pt`` file written by ``sharpscope train``/:func:`sharpscope.train.fit`, or a file of weights
            written by another tool (the module docstring lists them: a bare ``state_dict``, DDP, Lightning,
            timm, a training script's dict, safetensors, a Hugging Face ``save_pretrained`` folder).
        map_location: where tensors go (``"cpu"`` loads a CUDA checkpoint on a machine without a GPU).
        model: load the weights into this module instead of rebuilding from the stored spec.
        spec: ``{"name", "num_classes", "kwargs"}`` to build the model for a bare ``state_dict``.

    Raises:
        MissingModelError: weights only, and neither ``model=`` nor ``spec=`` says which architecture.
        UserInputError: missing, truncated or foreign file, or weights for another architecture.
    """
    path = Path(path)
    if model is None and spec is None and is_hf_folder(path):
        return _load_hf_folder(path, map_location)
    weights, raw, source = _read_weights(path, map_location)
    spec = spec if spec is not None else raw.get("model_spec")
    if model is None and spec is not None:
        model = _build(spec)
    if model is not None:
        weights = load_state_into(model, weights, f"checkpoint {str(path)!r}")
        if isinstance(map_location, (str, torch.device)):
            model.to(torch.device(map_location))
        model.eval()
    elif raw:
        raise MissingModelError(f"{str(path)!r} was saved from a user model (no model spec): pass model= to "
                                f"load_checkpoint", path)
    else:
        raise MissingModelError(f"{str(path)!r} is a bare state_dict: pass model= (an nn.Module) or spec= "
                                f"({{'name', 'num_classes', 'kwargs'}}) to load_checkpoint (the {source} file holds "
                                f"weights, not the architecture)", path)
    return Checkpoint(path=path, model=model, spec=spec, state_dict=weights, history=list(raw.get("history") or []),
                      optimizer_config=dict(raw.get("optimizer_config") or {}), epoch=int(raw.get("epoch", 0)),
                      step=int(raw.get("step", 0)), raw=raw, source_format=source)


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, raw)`` of a checkpoint file, checked (archive CRCs, tensor digest, field types).

    ``raw`` is the stored dict of a sharpscope checkpoint, or ``{}`` for a foreign file of weights. The
    ``module.``/``model.``/``_orig_mod.`` prefix carried by every key is removed (:func:`strip_prefixes`).
    """
    weights, raw, _ = _read_weights(Path(path), map_location)
    return strip_prefixes(weights), raw


def _read_weights(path: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(weights as stored, raw, source format)``; a Hugging Face folder's weights are read from its files."""
    if is_hf_folder(path):
        return _read_hf_folder(path, map_location), {}, "huggingface"
    obj = _read(path, map_location)
    weights, source = _weights_of(obj, path)
    raw = obj if isinstance(obj, dict) and obj.get("format") == FORMAT else {}
    if raw:
        _check_fields(raw, path)
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise UserInputError(f"{str(path)!r} has checkpoint format {raw['format_version']}, newer than this "
                                 f"sharpscope understands ({FORMAT_VERSION}); upgrade sharpscope")
        _verify_digest(raw, path)
    elif _is_safetensors_path(path):
        source = "safetensors"
    return weights, raw, source


def _is_safetensors_path(path: Path) -> bool:
    with open(path, "rb") as handle:
        return _is_safetensors(handle)

def _build(spec: Any) -> nn.Module:
    """The zoo model of a spec (``{"name", "num_classes", "kwargs"}``), with one-line errors."""
    try:
        _check_spec(spec)
        return build_model(spec["name"], int(spec["num_classes"]), **dict(spec.get("kwargs") or {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserInputError(f"model spec {spec!r:.200} is malformed ({exc}); expected name, num_classes, "
                             f"kwargs") from None
    except (RuntimeError, MemoryError) as exc:  # e.g. a spec too large to allocate
        raise UserInputError(f"cannot build the model of spec {spec!r:.200}: {_first_line(exc)}") from None
