"""Datasets: the digits split, batching, augmentation, and the CIFAR / Tiny-ImageNet readers on fake
datasets written here in the exact official formats."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sharpscope.data import DATASET_NAMES, load_dataset, random_crop_flip
from sharpscope.errors import UserInputError

# ----------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    """Against sklearn's raw data: 1437/360, disjoint, together every image once, classes stratified."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert (len(train), len(test)) == (1437, 360)
    assert train.inputs.dtype == torch.uint8 and train.image_shape == (1, 8, 8)
    rows = lambda d: {(tuple(x.flatten().tolist()), int(y)) for x, y in zip(d.inputs, d.targets)}  # noqa: E731
    all_rows = [(tuple(r.astype(int).tolist()), int(t)) for r, t in zip(raw.data, raw.target)]
    assert sorted(rows(train) | rows(test)) == sorted(set(all_rows))
    assert len(train) + len(test) == len(all_rows)
    counts = np.bincount(test.targets.numpy(), minlength=10)
    expected = np.bincount(raw.target, minlength=10) * 360 / len(raw.target)
    assert np.all(np.abs(counts - expected) <= 1)
    # Fixed: a second load gives the same split.
    assert torch.equal(load_dataset("digits", train=False).inputs, test.inputs)


def test_digits_normalisation_uses_training_statistics():
    """Normalised training pixels have mean 0 and std 1 (numpy on the raw 0..16 values)."""
    train = load_dataset("digits")
    x, y = train.tensors()
    raw = train.inputs.numpy().astype(np.float64) / 16.0
    np.testing.assert_allclose(x.numpy(), (raw - raw.mean()) / raw.std(), rtol=1e-5, atol=1e-5)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    assert y.dtype == torch.int64 and len(train.tensors(n=10)[0]) == 10


# -------------------------------------------------------------------------------- batches, augment


def test_shuffled_epoch_visits_every_example_once_and_replays():
    """Each epoch is a permutation; the same (seed, epoch) replays it; another epoch differs."""
    data = load_dataset("synthetic", num_examples=70, seed=3)
    data.inputs[:, 0, 0, 0] = torch.arange(70, dtype=torch.uint8)  # tag each example in a pixel

    def order(epoch):
        tags = []
        for x, _y in data.batches(16, shuffle=True, seed=5, epoch=epoch, augment=False):
            assert x.dtype == torch.float32
            tags += torch.round(x[:, 0, 0, 0] * data.std[0] * 255 + data.mean[0] * 255).long().tolist()
        return tags

    assert sorted(order(0)) == list(range(70))
    assert order(0) == order(0) and order(0) != order(1)
    assert sum(1 for _ in data.batches(16, drop_last=True)) == 4 and data.num_batches(16) == 5
    loader = data.loader(batch_size=32)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [32, 32, 6] == [len(y) for _, y in loader]


def _reference_crops(image: np.ndarray, padding: int) -> dict[tuple[int, int, bool], np.ndarray]:
    """All crops (and mirrored crops) of the zero-padded image, keyed by (dy, dx, flipped), with numpy."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), image.dtype)
    padded[:, padding:padding + h, padding:padding + w] = image
    crops = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            crops[dy, dx, False], crops[dy, dx, True] = crop, crop[:, :, ::-1]
    return crops


def test_random_crop_flip_matches_numpy_reference():
    """Each augmented image is one of the numpy crops/flips of its own zero-padded original; draws vary."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (60, 3, 8, 8), dtype=torch.uint8)  # no zero pixel: crops are unambiguous
    out = random_crop_flip(images, g, padding=2)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    draws = []
    for orig, aug in zip(images.numpy(), out.numpy()):
        found = [key for key, ref in _reference_crops(orig, 2).items() if np.array_equal(aug, ref)]
        assert len(found) == 1
        draws.append(found[0])
    assert {flip for _, _, flip in draws} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in draws}) > 10
    again = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again)


# ----------------------------------------------------------------------------------- CIFAR readers


def _cifar_batch(n: int, rng: np.random.Generator, labels_key: bytes, classes: int) -> dict:
    batch = {b"batch_label": b"fake batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             labels_key: rng.integers(0, classes, n).tolist(), b"filenames": [b"x.png"] * n}
    if labels_key == b"fine_labels":
        batch[b"coarse_labels"] = [0] * n
    return batch


def write_fake_cifar10(folder: Path, n: int = 3, seed: int = 0) -> dict[str, dict]:
    """The official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, protocol-2 pickles."""
    rng = np.random.default_rng(seed)
    inner = folder / "cifar-10-batches-py"
    inner.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(n, rng, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n, rng, b"labels", 10)
    for name, batch in batches.items():
        (inner / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072, b"num_cases_per_batch": n}
    (inner / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_cifar10_folder_reader_decodes_channel_major_rows(tmp_path):
    """Pixel (c, r, col) of an image is byte c*1024 + r*32 + col of its row (the official encoding)."""
    batches = write_fake_cifar10(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", train=False)
    assert len(train) == 15 and len(test) == 3 and train.num_classes == 10
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    img = train.inputs.numpy()
    for i, c, r, col in [(0, 0, 0, 0), (4, 1, 5, 31), (14, 2, 31, 7)]:
        assert img[i, c, r, col] == rows[i, c * 1024 + r * 32 + col]
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.targets.tolist() == labels
    assert test.targets.tolist() == batches["test_batch"][b"labels"]
    assert train.classes[3] == "class3" and train.augment


def test_cifar10_archive_reader_equals_folder_reader(tmp_path):
    """The .tar.gz (read in place) gives the same tensors as the extracted folder."""
    write_fake_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = load_dataset("cifar10", root=archive)
    from_dir = load_dataset("cifar10", root=tmp_path / "src")
    assert torch.equal(from_tar.inputs, from_dir.inputs) and torch.equal(from_tar.targets, from_dir.targets)
    assert torch.equal(load_dataset("cifar10", root=tmp_path, train=False).inputs,
                       load_dataset("cifar10", root=tmp_path / "src", train=False).inputs)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    """cifar-100-python/{train,test,meta}: the 100 fine labels, not the 20 coarse ones."""
    rng = np.random.default_rng(1)
    inner = tmp_path / "cifar-100-python"
    inner.mkdir()
    train = _cifar_batch(6, rng, b"fine_labels", 100)
    (inner / "train").write_bytes(pickle.dumps(train, protocol=2))
    (inner / "test").write_bytes(pickle.dumps(_cifar_batch(2, rng, b"fine_labels", 100), protocol=2))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    (inner / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    data = load_dataset("cifar100", root=tmp_path)
    assert data.num_classes == 100 and data.targets.tolist() == train[b"fine_labels"]
    assert torch.equal(data.inputs.reshape(6, -1), torch.from_numpy(train[b"data"]))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_reader_refuses_code_in_pickles(tmp_path, monkeypatch):
    """A pickle that would run a command is refused (restricted unpickler), and nothing runs."""
    write_fake_cifar10(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=2))
    with pytest.raises(UserInputError, match="test_batch.*not a valid CIFAR python batch.*refusing"):
        load_dataset("cifar10", root=tmp_path, train=False)
    assert not (tmp_path / "PWNED").exists()


def test_cifar_missing_and_malformed_files_are_one_line_errors(tmp_path):
    """Missing folder names the expected layout; missing batch and wrong shapes name the file."""
    with pytest.raises(UserInputError, match="expected the folder cifar-10-batches-py/ with data_batch_1"):
        load_dataset("cifar10", root=tmp_path)
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(UserInputError, match="data_batch_4.* is missing"):
        load_dataset("cifar10", root=tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(UserInputError, match=r"test_batch' is malformed: expected uint8 data of shape \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path, train=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserInputError, match="not a valid CIFAR python batch") as info:
        load_dataset("cifar10", root=tmp_path, train=False)
    assert "\n" not in str(info.value)
    broken = tmp_path / "cifar-10-python.tar.gz"
    broken.write_bytes(b"not a tar")
    with pytest.raises(UserInputError, match="cannot read CIFAR archive"):
        load_dataset("cifar10", root=broken)


# --------------------------------------------------------------------------------- Tiny-ImageNet

_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_fake_tiny(folder: Path, per_class: int = 2) -> list[str]:
    """tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*.JPEG,val/images,val/val_annotations.txt}."""
    base = folder / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other\n" for i, w in enumerate(wnids)))
    for label, wnid in enumerate(wnids):
        folder_images = base / "train" / wnid / "images"
        folder_images.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (64, 64), _COLOURS[label]).save(folder_images / f"{wnid}_{k}.JPEG", quality=95)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k, label in enumerate([2, 0, 1, 2]):
        name = f"val_{k}.JPEG"
        img = Image.new("RGB", (64, 64), _COLOURS[label])
        (img.convert("L") if k == 3 else img).save(base / "val" / "images" / name, quality=95)  # one grey image
        lines.append(f"{name}\t{wnids[label]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tiny_imagenet_reader_labels_follow_wnids(tmp_path):
    """Labels are the wnids.txt order; colours survive JPEG to within a few levels; grey -> RGB."""
    write_fake_tiny(tmp_path)
    train = load_dataset("tiny_imagenet", root=tmp_path, show_progress=False)
    val = load_dataset("tiny-imagenet", root=tmp_path / "tiny-imagenet-200", train=False, show_progress=False)
    assert train.inputs.shape == (6, 3, 64, 64) and train.inputs.dtype == torch.uint8
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2] and train.num_classes == 3
    for x, y in zip(train.inputs, train.targets):
        assert np.allclose(x.float().mean((1, 2)).numpy(), _COLOURS[int(y)], atol=3)
    assert val.targets.tolist() == [2, 0, 1, 2]
    grey = val.inputs[3].float()
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    assert train.classes[1] == "thing 1, other"


def test_tiny_imagenet_bad_layouts(tmp_path):
    """Missing root, missing class folder, bad annotation line and a wrong image size: one-line errors."""
    with pytest.raises(UserInputError, match="no Tiny-ImageNet data.*wnids.txt"):
        load_dataset("tiny_imagenet", root=tmp_path)
    wnids = write_fake_tiny(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(UserInputError, match="line 1 is malformed or names a class not in wnids.txt"):
        load_dataset("tiny_imagenet", root=tmp_path, train=False, show_progress=False)
    Image.new("RGB", (32, 32)).save(base / "train" / wnids[0] / "images" / "small.JPEG")
    with pytest.raises(UserInputError, match="is 32x32, expected 64x64"):
        load_dataset("tiny_imagenet", root=tmp_path, show_progress=False)
    for p in (base / "train" / wnids[1] / "images").iterdir():
        p.unlink()
    (base / "train" / wnids[1] / "images").rmdir()
    with pytest.raises(UserInputError, match=f"class folder .*{wnids[1]}.* is missing"):
        load_dataset("tiny_imagenet", root=tmp_path, show_progress=False)


def test_tiny_imagenet_refuses_annotation_paths_that_leave_the_dataset(tmp_path, monkeypatch):
    """A val_annotations.txt line naming ../../../outside.png (a real, decodable 64x64 image outside the
    dataset) is refused with one line, and the outside file is never opened (Image.open is watched)."""
    write_fake_tiny(tmp_path / "data")
    base = tmp_path / "data" / "tiny-imagenet-200"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "outside.png")
    (base / "val" / "val_annotations.txt").write_text("../../../outside.png\tn01443537\t0\t0\t63\t63\n")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path)) or real_open(path, *a, **k))
    with pytest.raises(UserInputError, match=r"line 1 names '\.\./\.\./\.\./outside\.png'.*refusing") as info:
        load_dataset("tiny_imagenet", root=tmp_path / "data", train=False, show_progress=False)
    assert "\n" not in str(info.value) and opened == []


def test_tiny_imagenet_refuses_a_training_image_linked_outside(tmp_path):
    """A symbolic link in train/<wnid>/images pointing outside the dataset folder is refused by name."""
    wnids = write_fake_tiny(tmp_path / "data")
    Image.new("RGB", (64, 64)).save(tmp_path / "secret.JPEG")
    (tmp_path / "data" / "tiny-imagenet-200" / "train" / wnids[0] / "images" / "z.JPEG").symlink_to(
        tmp_path / "secret.JPEG")
    with pytest.raises(UserInputError, match="z.JPEG.*outside the dataset folder"):
        load_dataset("tiny_imagenet", root=tmp_path / "data", show_progress=False)


@pytest.mark.parametrize("limit, size", [(10_000, (150, 150)), (30_000, (200, 200))])
def test_tiny_imagenet_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch, limit, size):
    """Pillow's bomb guard, scaled down through Image.MAX_IMAGE_PIXELS: an image above twice the limit
    (DecompressionBombError) and one between the limit and twice it (DecompressionBombWarning, which
    would otherwise only warn) are both one UserInputError naming the file."""
    wnids = write_fake_tiny(tmp_path)
    bomb = tmp_path / "tiny-imagenet-200" / "train" / wnids[2] / "images" / "bomb.png"
    Image.new("RGB", size).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UserInputError, match="bomb.png.*decompression bomb") as info:
        load_dataset("tiny_imagenet", root=tmp_path, show_progress=False)
    assert "\n" not in str(info.value)


def test_tiny_imagenet_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 3000x3000 image (far beyond 64x64, below Pillow's bomb limit) is refused from its header:
    no pixel data is ever decoded (Image.Image.load is watched)."""
    wnids = write_fake_tiny(tmp_path)
    Image.new("L", (3000, 3000)).save(tmp_path / "tiny-imagenet-200" / "train" / wnids[1] / "images" / "big.png")
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(UserInputError, match="big.png' is 3000x3000, expected 64x64"):
        load_dataset("tiny_imagenet", root=tmp_path, show_progress=False, workers=1)
    assert (3000, 3000) not in decoded


def test_cifar_archive_refuses_link_members(tmp_path):
    """An archive whose test_batch is a symbolic link (to ../../outside, or to another member) is refused
    by name; the real archive layout (regular members) still reads (see the archive test above)."""
    write_fake_cifar10(tmp_path / "src")
    for target in ("../../outside", "data_batch_1"):
        archive = tmp_path / f"cifar-10-python-{target.count('.')}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted((tmp_path / "src" / "cifar-10-batches-py").iterdir()):
                if path.name != "test_batch":
                    tar.add(path, arcname=f"cifar-10-batches-py/{path.name}")
            link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        with pytest.raises(UserInputError, match=f"test_batch is a link to '{re.escape(target)}'.*refusing"):
            load_dataset("cifar10", root=archive, train=False)


def test_cifar_folder_refuses_files_linked_outside(tmp_path):
    """An extracted folder whose test_batch links to a file outside the folder is refused by name."""
    write_fake_cifar10(tmp_path / "data")
    inner = tmp_path / "data" / "cifar-10-batches-py"
    (inner / "test_batch").rename(tmp_path / "elsewhere")
    (inner / "test_batch").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserInputError, match="test_batch' is a link to .*outside the dataset folder"):
        load_dataset("cifar10", root=tmp_path / "data", train=False)


def test_size_arguments_use_the_one_validator():
    """Bad sizes are UserInputError (a ValueError) naming the argument, also for a float batch size."""
    data = load_dataset("synthetic", num_examples=4)
    with pytest.raises(UserInputError, match="batch_size must be an integer >= 1; got 2.5"):
        next(data.batches(2.5))
    with pytest.raises(UserInputError, match="num_examples must be an integer >= 1; got 0"):
        load_dataset("synthetic", num_examples=0)
    with pytest.raises(UserInputError, match="padding must be an integer >= 0"):
        random_crop_flip(data.inputs, torch.Generator(), padding=-1)
    with pytest.raises(UserInputError, match="workers must be an integer >= 1"):
        load_dataset("tiny_imagenet", root="nowhere", workers=0)


# ----------------------------------------------------------------------------- synthetic, names


def test_synthetic_is_deterministic_and_learnable_by_nearest_prototype():
    """Same seed, same data; a nearest-class-mean classifier (numpy) beats chance on the test split."""
    a, b = load_dataset("synthetic", num_examples=200), load_dataset("synthetic", num_examples=200)
    assert torch.equal(a.inputs, b.inputs) and a.inputs.shape == (200, 3, 32, 32)
    test = load_dataset("synthetic", train=False, num_examples=100)
    x, y = a.inputs.flatten(1).float().numpy(), a.targets.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    xt = test.inputs.flatten(1).float().numpy()
    pred = ((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == test.targets.numpy()).mean() > 0.5


def test_unknown_dataset_lists_the_valid_names():
    """One line naming every valid dataset."""
    with pytest.raises(UserInputError, match="unknown dataset 'mnist'; choose one of: " + ", ".join(DATASET_NAMES)):
        load_dataset("mnist")
    with pytest.raises(UserInputError, match="bad options for dataset 'digits'"):
        load_dataset("digits", num_examples=3)


def test_pickle_buffer_roundtrip_helper():
    """The restricted unpickler reads what numpy + pickle protocol 2 write (arrays and bytes)."""
    from sharpscope.data.cifar import load_pickle_arrays

    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"name": b"x", b"labels": [1, 2]}
    back = load_pickle_arrays(pickle.dumps(obj, protocol=2))
    assert np.array_equal(back[b"data"], obj[b"data"]) and back[b"labels"] == [1, 2]
    with pytest.raises(pickle.UnpicklingError):
        load_pickle_arrays(pickle.dumps(io.BytesIO(b""), protocol=2))
