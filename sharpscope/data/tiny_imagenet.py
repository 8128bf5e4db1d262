"""Tiny-ImageNet-200 (Stanford CS231n) from its extracted folder, decoded with pillow.

Layout (the official ``tiny-imagenet-200.zip`` extracted; ``root`` is that folder or its parent)::

    tiny-imagenet-200/wnids.txt                  200 class ids, one per line (defines the label order)
    tiny-imagenet-200/words.txt                  optional: wnid <tab> readable names
    tiny-imagenet-200/train/<wnid>/images/*.JPEG 500 training images per class
    tiny-imagenet-200/val/images/*.JPEG          10 000 validation images
    tiny-imagenet-200/val/val_annotations.txt    file <tab> wnid <tab> box...

``train=False`` gives the labelled validation set (the official test set has no labels). Images are
64x64 RGB (grey ones are converted), stored as uint8 ``(N, 3, 64, 64)``.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import _validate
from .._progress import progress
from ..errors import UserInputError
from .dataset import TensorData

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2770, 0.2691, 0.2821)
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_EXPECTED = ("expected tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG and "
             "val/images/*.JPEG + val/val_annotations.txt (the extracted official zip)")


def _find_root(root: Path) -> Path:
    for path in (root / "tiny-imagenet-200", root):
        if (path / "wnids.txt").is_file():
            return path
    raise UserInputError(f"no Tiny-ImageNet data under {str(root)!r}: {_EXPECTED}; pass --data-root")


def _read_image(path: Path) -> np.ndarray:
    """The pixels of one 64x64 image; anything else is refused from its header, before decoding.

    Pillow refuses (or warns about) images of more than ``Image.MAX_IMAGE_PIXELS`` pixels, a
    defence against decompression bombs; :func:`load_tiny_imagenet` turns the warning into an error,
    and both become one line naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.size != (64, 64):  # before decoding: a bomb never gets to allocate its pixels
                raise UserInputError(f"Tiny-ImageNet image {str(path)!r} is {img.size[0]}x{img.size[1]}, "
                                     f"expected 64x64")
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserInputError(f"Tiny-ImageNet image {str(path)!r} is refused as a decompression bomb "
                             f"({exc})") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise UserInputError(f"cannot decode Tiny-ImageNet image {str(path)!r} ({exc})") from None
    return pixels


def _contained(base: Path, folder: Path, paths: list[Path], origin: str) -> list[Path]:
    """``paths`` (plain names in ``folder``) if they all stay inside the dataset folder ``base``.

    ``folder`` is resolved once; a path is resolved only when it is a symbolic link (an ``lstat``
    each), so checking the 100 000 training images takes about a second.
    """
    root = base.resolve()
    for path in [folder, *(p for p in paths if p.is_symlink())]:
        if not path.resolve().is_relative_to(root):
            raise UserInputError(f"{origin} names {str(path)!r}, which lies outside the dataset folder "
                                 f"{str(base)!r} (a link to {str(path.resolve())!r}); refusing to read it")
    return paths


def _train_files(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise UserInputError(f"Tiny-ImageNet class folder {str(folder)!r} is missing; {_EXPECTED}")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not found:
            raise UserInputError(f"Tiny-ImageNet class folder {str(folder)!r} holds no images; {_EXPECTED}")
        files += _contained(base, folder, found, f"class folder {str(folder)!r}")
        labels += [label] * len(found)
    return files, labels


def _val_files(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserInputError(f"Tiny-ImageNet file {str(annotations)!r} is missing; {_EXPECTED}")
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise UserInputError(f"{str(annotations)!r} line {n} is malformed or names a class not in wnids.txt: "
                                 f"{line[:60]!r}")
        name = parts[0]
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise UserInputError(f"{str(annotations)!r} line {n} names {name!r}: expected a plain file name in "
                                 "val/images/ (no folders); refusing to read it")
        files.append(base / "val" / "images" / name)
        labels.append(index[parts[1]])
    if not files:
        raise UserInputError(f"{str(annotations)!r} is empty; {_EXPECTED}")
    return _contained(base, base / "val" / "images", files, str(annotations)), labels


def load_tiny_imagenet(root: str | Path, train: bool = True, show_progress: bool = True,
                       workers: int = 8) -> TensorData:
    """Read the training (100 000 images) or validation (10 000) split."""
    from PIL import Image

    workers = _validate.positive_int(workers, "workers")
    base = _find_root(Path(root).expanduser())
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserInputError(f"{str(base / 'wnids.txt')!r} must list distinct class ids, one per line")
    files, labels = _train_files(base, wnids) if train else _val_files(base, wnids)
    with ThreadPoolExecutor(max_workers=workers) as pool, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the filters are global: threads see it
        images = list(progress(pool.map(_read_image, files), enabled=show_progress, total=len(files),
                               desc=f"tiny-imagenet {'train' if train else 'val'}"))
    names = dict(wnid_line.split("\t", 1) for wnid_line in _read_words(base))
    return TensorData(inputs=torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()),
                      targets=torch.tensor(labels, dtype=torch.int64), num_classes=len(wnids),
                      name=f"tiny_imagenet/{'train' if train else 'val'}", mean=TINY_MEAN, std=TINY_STD,
                      scale=255.0, augment=True, classes=[names.get(w, w).strip() for w in wnids])


def _read_words(base: Path) -> list[str]:
    words = base / "words.txt"
    if not words.is_file():
        return []
    return [line for line in words.read_text(errors="replace").splitlines() if "\t" in line]
