"""CIFAR-10 and CIFAR-100 from the official "python version" files, without torchvision.

Accepted layouts for ``root`` (https://www.cs.toronto.edu/~kriz/cifar.html):

* a folder holding ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``, ``test_batch``,
  ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``);
* that inner folder itself;
* the archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, or a folder holding it
  (read in place, nothing is extracted).

The batches are Python pickles, which is the official format. They are read with a restricted
unpickler that only rebuilds numpy arrays, bytes, lists and dicts: any other object in the file
is refused instead of being constructed.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserInputError
from .dataset import TensorData

# Per-channel mean and std of the training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    10: {"folder": "cifar-10-batches-py", "archive": "cifar-10-python.tar.gz",
         "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "labels": b"labels", "names": b"label_names"},
    100: {"folder": "cifar-100-python", "archive": "cifar-100-python.tar.gz",
          "train": ["train"], "test": ["test"], "meta": "meta", "labels": b"fine_labels",
          "names": b"fine_label_names"},
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays (and the builtin containers pickle needs no lookup for)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # the name numpy 1.x wrote; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_pickle_arrays(payload: bytes) -> Any:
    """Unpickle a CIFAR batch (Python 2 pickle, byte-string keys) allowing only numpy arrays."""
    return _ArrayUnpickler(io.BytesIO(payload), encoding="bytes").load()


def _locate(root: Path, layout: dict[str, Any]) -> tuple[str, Path]:
    """Find the folder or the archive; return ("dir", folder) or ("tar", archive)."""
    candidates = [("dir", root / layout["folder"]), ("dir", root), ("tar", root / layout["archive"]), ("tar", root)]
    for kind, path in candidates:
        if kind == "dir" and path.is_dir() and (path / layout["test"][0]).is_file():
            return kind, path
        if kind == "tar" and path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return kind, path
    raise UserInputError(
        f"no CIFAR data under {str(root)!r}: expected the folder {layout['folder']}/ with "
        f"{', '.join(layout['train'] + layout['test'])} and {layout['meta']}, or the archive {layout['archive']} "
        f"(the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html); pass --data-root")


def _read_members(kind: str, path: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    if kind == "dir":
        return {name: _read_file(path, name, names) for name in names}
    try:
        with tarfile.open(path, "r:*") as tar:
            return {name: _read_member(tar, path, f"{folder}/{name}") for name in names}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserInputError(f"cannot read CIFAR archive {str(path)!r} ({exc}); re-download it") from None


def _read_file(folder: Path, name: str, names: list[str]) -> bytes:
    """One batch file of an extracted folder; a link resolving outside the folder is refused."""
    file = folder / name
    if not file.is_file():
        raise UserInputError(f"CIFAR file {str(file)!r} is missing; expected {', '.join(names)} in {folder}")
    if not file.resolve().is_relative_to(folder.resolve()):
        raise UserInputError(f"CIFAR file {str(file)!r} is a link to {str(file.resolve())!r}, outside the dataset "
                             f"folder {str(folder)!r}; refusing to read it")
    return file.read_bytes()


def _read_member(tar: tarfile.TarFile, path: Path, name: str) -> bytes:
    """The bytes of the regular-file member ``name``; links (which point elsewhere) are refused."""
    try:
        member = tar.getmember(name)
    except KeyError:
        raise UserInputError(f"archive {str(path)!r} has no {name}; is it the official CIFAR 'python version' "
                             "archive?") from None
    if not member.isfile():
        what = f"a link to {member.linkname!r}" if member.issym() or member.islnk() else "a special file"
        raise UserInputError(f"archive {str(path)!r}: member {name} is {what}, not a regular file; "
                             "refusing to read it")
    handle = tar.extractfile(member)
    if handle is None:
        raise UserInputError(f"archive {str(path)!r}: member {name} cannot be read")
    return handle.read()


def _decode(name: str, payload: bytes, key: str | bytes) -> Any:
    try:
        obj = load_pickle_arrays(payload)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise UserInputError(f"CIFAR file {name!r} is not a valid CIFAR python batch ({exc})") from None
    if not isinstance(obj, dict) or key not in obj:
        raise UserInputError(f"CIFAR file {name!r} is not a valid CIFAR python batch (no {key!r} entry)")
    return obj


def load_cifar(root: str | Path, num_classes: int = 10, train: bool = True) -> TensorData:
    """Read CIFAR-10 (``num_classes=10``) or CIFAR-100 (``100``, fine labels) as uint8 ``(N, 3, 32, 32)``."""
    if num_classes not in _LAYOUT:
        raise UserInputError(f"num_classes must be 10 or 100, got {num_classes!r}")
    layout = _LAYOUT[num_classes]
    kind, path = _locate(Path(root).expanduser(), layout)
    split = layout["train"] if train else layout["test"]
    raw = _read_members(kind, path, layout["folder"], split + [layout["meta"]])
    images, labels = [], []
    for name in split:
        batch = _decode(name, raw[name], b"data")
        data = np.asarray(batch[b"data"])
        target = np.asarray(batch.get(layout["labels"], []), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(target) != len(data):
            raise UserInputError(f"CIFAR file {name!r} is malformed: expected uint8 data of shape (N, 3072) and N "
                                 f"{layout['labels'].decode()}, got {data.dtype} {data.shape} and {len(target)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(target)
    meta = _decode(layout["meta"], raw[layout["meta"]], layout["names"])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout["names"]]]
    y = torch.from_numpy(np.concatenate(labels))
    if len(classes) != num_classes or (len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
        raise UserInputError(f"CIFAR-{num_classes} files under {str(path)!r} are inconsistent: {len(classes)} class "
                             f"names, labels in [{int(y.min())}, {int(y.max())}]")
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return TensorData(inputs=torch.from_numpy(np.ascontiguousarray(np.concatenate(images))), targets=y,
                      num_classes=num_classes, name=f"cifar{num_classes}/{'train' if train else 'test'}",
                      mean=mean, std=std, scale=255.0, augment=True, classes=classes)
