"""The result protocol for landscapes, directions, Z-scores, masks and alignment (issue 11).

Checked against independent things: files written by sharpscope 0.1.0 (tests/fixtures/results_v0_1)
and the numbers today's code recomputes for the model and data that made them; bit-for-bit
equality of tensors after a save/load; and hand-damaged files (a variable removed) that must be
refused with one line instead of a ``KeyError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from torch import nn

import sharpscope as ss
from sharpscope.analysis.directions import Direction, TrajectoryDirections, trajectory_directions
from sharpscope.analysis.gradients import ZScoreResult, gradient_zscores, load_zscores
from sharpscope.analysis.landscape import Landscape, landscape_1d, landscape_2d
from sharpscope.analysis.masks import (
    AlignmentResult,
    MaskStatisticsResult,
    ZSharpMasks,
    load_mask_statistics,
    mask_statistics,
    perturbation_alignment,
    save_mask_statistics,
    zsharp_masks,
)
from sharpscope.analysis.results import model_fingerprint, read_dataset, result_kind, write_dataset
from sharpscope.errors import UserInputError

FIXTURES = Path(__file__).parent / "fixtures" / "results_v0_1"
LOSS = nn.CrossEntropyLoss()


def fixture_model_and_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model and data tests/fixtures/make_results_v0_1.py used (same seeds, same order of draws)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g))


@pytest.fixture(scope="module")
def fixture_setup():
    model, data = fixture_model_and_data()
    if model_fingerprint(model) != "43d49c7387e01b20":
        pytest.skip("this torch draws other initial weights than the one that wrote the fixtures")
    return model, data


# --- old files load, by their class and by sharpscope.load ------------------------------------------
@pytest.mark.parametrize("name, cls", [("landscape_1d", Landscape), ("landscape_2d", Landscape),
                                       ("zscores", ZScoreResult), ("mask_statistics", MaskStatisticsResult),
                                       ("alignment", AlignmentResult)])
def test_fixture_loads_by_class_and_by_sharpscope_load(name, cls):
    """Both readers give the class of the kind stored in the 0.1.0 file, with the file's settings
    (read independently with read_dataset) and an empty provenance (0.1.0 wrote none)."""
    path = FIXTURES / f"{name}.nc"
    by_class, by_kind = cls.load(path), ss.load(path)
    assert type(by_class) is cls and type(by_kind) is cls
    _, header = read_dataset(path, result_kind(path))
    expected = {k: v for k, v in header.items() if k != "_columns"}
    assert by_class.settings == expected and by_kind.settings == expected
    assert by_class.provenance == {}
    pd.testing.assert_frame_equal(by_class.to_dataframe(), by_kind.to_dataframe())


def test_fixture_landscapes_hold_the_loss_of_the_fixture_model(fixture_setup):
    """At the origin (x = 0, and x = y = 0) the stored loss is the cross-entropy of the model that
    made the file, computed here directly."""
    model, (x, y) = fixture_setup
    with torch.no_grad():
        expected = float(LOSS(model(x), y))
    one, two = Landscape.load(FIXTURES / "landscape_1d.nc"), Landscape.load(FIXTURES / "landscape_2d.nc")
    assert one.loss[list(one.coords["x"]).index(0.0)] == pytest.approx(expected, rel=1e-6)
    assert two.loss[1, 1] == pytest.approx(expected, rel=1e-6) and two.complete


def test_fixture_tables_equal_todays_recomputation(fixture_setup):
    """Z-score and mask-statistics tables in the 0.1.0 files equal what today's code computes for
    the same model and data (old readers and new analyses agree)."""
    model, data = fixture_setup
    fresh = mask_statistics(model, LOSS, [data, data], progress=False)
    old = load_mask_statistics(FIXTURES / "mask_statistics.nc")
    pd.testing.assert_frame_equal(old.to_dataframe(), fresh.to_dataframe(), check_dtype=False, rtol=1e-6)
    assert old.attrs["total_perturbation_norm_global"] == pytest.approx(fresh.settings["total_perturbation_norm_global"])
    z_old = load_zscores(FIXTURES / "zscores.nc")
    z_new = gradient_zscores(model, LOSS, [data, data], progress=False)
    pd.testing.assert_frame_equal(z_old.to_dataframe(), z_new.to_dataframe(), check_dtype=False, rtol=1e-6)


# --- fresh results round-trip with settings and provenance -------------------------------------------
def _small():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(4)
    return model, [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def test_fresh_results_round_trip_with_provenance(tmp_path):
    """Every result kind of this area writes provenance() into its settings and reads back with the
    same table and the same settings, by its class and by sharpscope.load."""
    model, data = _small()
    results = [
        landscape_1d(model, LOSS, data, steps=3, progress=False),
        landscape_2d(model, LOSS, data, x=2, y=3, progress=False),
        gradient_zscores(model, LOSS, data, progress=False),
        mask_statistics(model, LOSS, data, progress=False),
        mask_statistics(model, LOSS, data, per_batch=True, progress=False),
        perturbation_alignment(model, LOSS, data, k=1, methods=("sam", "zsharp"), progress=False),
        zsharp_masks(model, LOSS, data),
    ]
    for k, res in enumerate(results):
        assert res.provenance["sharpscope"] == ss.__version__ and res.provenance["torch"] == torch.__version__
        path = res.save(tmp_path / f"r{k}.nc")
        for back in (type(res).load(path), ss.load(path)):
            assert type(back) is type(res)
            assert back.settings == res.settings, type(res).__name__
            pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe(), check_dtype=False)


def test_zsharp_masks_is_a_mapping_and_round_trips_bit_exactly(tmp_path):
    """zsharp_masks still reads like the dict it returned (names -> bool tensors of the weights' shapes);
    the saved file gives back the identical masks."""
    model, data = _small()
    masks = zsharp_masks(model, LOSS, data, 0.9)
    assert list(masks) == ["0.weight", "2.weight"] and dict(masks).keys() == masks.keys()
    assert masks["0.weight"].dtype == torch.bool and masks["0.weight"].shape == model[0].weight.shape
    back = ZSharpMasks.load(masks.save(tmp_path / "m.nc"))
    for name in masks:
        assert torch.equal(back[name], masks[name])
    assert back.to_dataframe()["kept"].tolist() == [int(m.sum()) for m in masks.values()]


def test_direction_round_trips_bit_exactly_in_every_dtype(tmp_path):
    """Names, order, shapes, dtypes and every bit (float16/bfloat16/int64/bool kept as raw bytes,
    -0.0 and subnormals included) survive save -> load; meta too."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(2, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(4, 5, generator=g, dtype=torch.float64),
        "half": torch.randn(7, generator=g).half(),
        "brain": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([-(2**40), 3, 0]),
        "mask": torch.tensor([True, False, True]),
        "edge": torch.tensor([-0.0, 1e-45, float(torch.finfo(torch.float32).max)]),
    }
    d = Direction(tensors, {"kind": "custom", "seed": 5})
    back = Direction.load(d.save(tmp_path / "d.nc"))
    assert list(back) == list(tensors) and back.meta == d.meta
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert back[name].view(torch.uint8).tolist() == t.contiguous().view(torch.uint8).tolist(), name
    assert back.fingerprint() == d.fingerprint() and isinstance(ss.load(tmp_path / "d.nc"), Direction)


def test_trajectory_directions_round_trip(tmp_path):
    """Directions (bit for bit), variance ratios, coordinates, origin and settings read back."""
    torch.manual_seed(0)
    path = [nn.Linear(3, 2) for _ in range(4)]
    traj = trajectory_directions(path, n=2)
    back = TrajectoryDirections.load(traj.save(tmp_path / "t.nc"))
    np.testing.assert_array_equal(back.coordinates, traj.coordinates)
    np.testing.assert_array_equal(back.explained_variance_ratio, traj.explained_variance_ratio)
    assert back.origin == traj.origin == 3 and back.settings == traj.settings
    for a, b in zip(traj.directions, back.directions):
        assert a.fingerprint() == b.fingerprint() and a.meta == b.meta
    pd.testing.assert_frame_equal(back.to_dataframe(), traj.to_dataframe())


# --- a file of the right kind with a variable missing: one line, not a KeyError ----------------------
def _without(path: Path, variable: str, out: Path) -> Path:
    """Rewrite ``path`` without ``variable``, keeping its kind and metadata (a damaged file)."""
    kind = result_kind(path)
    ds, meta = read_dataset(path, kind)
    write_dataset(ds.drop_vars(variable), out, kind, meta)
    return out


def _fresh_files(tmp_path: Path) -> dict[str, tuple[type, Path, str]]:
    model, data = _small()
    (d,) = ss.random_directions(model, 1)
    traj = trajectory_directions([nn.Linear(3, 2) for _ in range(3)], n=1)
    return {
        "direction": (Direction, d.save(tmp_path / "d.nc"), "t0"),
        "trajectory": (TrajectoryDirections, traj.save(tmp_path / "t.nc"), "coordinates"),
        "trajectory_tensor": (TrajectoryDirections, tmp_path / "t.nc", "d0_t1"),
        "masks": (ZSharpMasks, zsharp_masks(model, LOSS, data).save(tmp_path / "m.nc"), "m1"),
    }


@pytest.mark.parametrize("cls, name, variable", [
    (Landscape, "landscape_1d", "loss"), (Landscape, "landscape_2d", "done"), (ZScoreResult, "zscores", "counts"),
    (ZScoreResult, "zscores", "threshold"), (MaskStatisticsResult, "mask_statistics", "kept_fraction"),
    (AlignmentResult, "alignment", "cosine"),
])
def test_fixture_missing_a_variable_is_one_line(tmp_path, cls, name, variable):
    """An old file with one variable removed is refused by the class and by sharpscope.load with a
    one-line UserInputError naming the missing variable (today: KeyError on first use or at load)."""
    damaged = _without(FIXTURES / f"{name}.nc", variable, tmp_path / "damaged.nc")
    for reader in (cls.load, ss.load):
        with pytest.raises(UserInputError, match=variable) as err:
            reader(damaged)
        assert "\n" not in str(err.value)


def test_fresh_file_missing_a_variable_is_one_line(tmp_path):
    """Directions, trajectories and masks files lacking a tensor variable: one line, not a KeyError."""
    for what, (cls, path, variable) in _fresh_files(tmp_path).items():
        damaged = _without(path, variable, tmp_path / f"damaged_{what}.nc")
        for reader in (cls.load, ss.load):
            with pytest.raises(UserInputError, match="damaged|complete") as err:
                reader(damaged)
            assert "\n" not in str(err.value), what


def test_damaged_landscape_header_is_one_line(tmp_path):
    """A landscape file whose settings lost the metric names is refused in one line."""
    ds, meta = read_dataset(FIXTURES / "landscape_1d.nc", "landscape")
    meta.pop("metrics")
    write_dataset(ds, tmp_path / "l.nc", "landscape", meta)
    with pytest.raises(UserInputError, match="metric names"):
        Landscape.load(tmp_path / "l.nc")


def test_save_mask_statistics_alias_accepts_a_plain_table(tmp_path):
    """The 0.1 writer still takes a DataFrame with attrs; the file reads back as the result class."""
    table = pd.DataFrame({"layer": ["a.weight"], "numel": [4], "kept_fraction": [0.25]})
    table.attrs = {"percentile": 0.9}
    back = load_mask_statistics(save_mask_statistics(table, tmp_path / "m.nc"))
    assert isinstance(back, MaskStatisticsResult) and back.settings == {"percentile": 0.9}
    assert back["kept_fraction"].tolist() == [0.25]
    assert isinstance(xr.load_dataset(tmp_path / "m.nc", engine="scipy"), xr.Dataset)
