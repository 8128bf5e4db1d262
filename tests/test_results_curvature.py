"""The curvature and sharpness results follow the one result protocol; bad input to them is one line.

Old files: tests/fixtures/results_v0_1/ were written by sharpscope 0.1.0 (tests/fixtures/make_results_v0_1.py
on a Linear(4, 6)-Tanh-Linear(6, 3) model, 24 examples), so they are independent of today's writers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sharpscope
from sharpscope.analysis.hessian import (
    MAX_SLQ_STEPS,
    DensityResult,
    EigenResult,
    LayerCurvatureResult,
    TraceResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    layer_curvature,
    load_layer_curvature,
    save_layer_curvature,
)
from sharpscope.analysis.results import Result, provenance, write_dataset
from sharpscope.analysis.sharpness import SharpnessResult, sharpness
from sharpscope.errors import UserInputError
from tests._curvature_models import mlp_data, tiny_mlp

FIXTURES = Path(__file__).parent / "fixtures" / "results_v0_1"
CE = nn.CrossEntropyLoss()
QUIET = {"progress": False}
OLD = {"eigen.nc": EigenResult, "trace.nc": TraceResult, "density.nc": DensityResult,
       "layer_curvature.nc": LayerCurvatureResult, "sharpness.nc": SharpnessResult}
# The 0.1.0 fixture model: Linear(4, 6) + Linear(6, 3) = 30 + 21 parameters in four tensors.
FIXTURE_DIM, FIXTURE_LAYERS = 51, ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("name", sorted(OLD))
def test_old_files_load_with_the_class_and_with_sharpscope_load(name: str) -> None:
    """Each 0.1.0 file loads with Class.load and with sharpscope.load as that class (a Result), with no
    provenance (0.1.0 wrote none), and gives a table."""
    cls = OLD[name]
    direct, generic = cls.load(FIXTURES / name), sharpscope.load(FIXTURES / name)
    assert type(direct) is cls and type(generic) is cls and isinstance(generic, Result)
    assert direct.provenance == {} and "seed" in direct.settings
    pd.testing.assert_frame_equal(direct.to_dataframe(), generic.to_dataframe())
    assert len(direct.to_dataframe()) >= 1


def test_old_files_hold_what_0_1_wrote() -> None:
    """Spot checks against what make_results_v0_1.py asked for: k=2 eigenpairs over 51 parameters,
    a 6-probe trace budget, one 8-step SLQ run, one layer_curvature row per tensor with boolean
    top_converged, a worst-case sharpness with 3 steps (trace of 4 values, never decreasing)."""
    eig = EigenResult.load(FIXTURES / "eigen.nc")
    assert eig.eigenvectors.shape == (FIXTURE_DIM, 2) and eig.eigenvalues[0] >= eig.eigenvalues[1]
    assert TraceResult.load(FIXTURES / "trace.nc").n_hvp == 6
    dens = DensityResult.load(FIXTURES / "density.nc")
    assert len(dens.nodes) == 1 and len(dens.nodes[0]) == 8
    layers = load_layer_curvature(FIXTURES / "layer_curvature.nc")
    assert isinstance(layers, LayerCurvatureResult) and list(layers["layer"]) == FIXTURE_LAYERS
    assert layers["top_converged"].dtype == bool and len(layers) == 4
    assert layers.attrs["settings"] == layers.settings  # 0.1 code read the settings from df.attrs
    sharp = SharpnessResult.load(FIXTURES / "sharpness.nc")
    assert sharp.kind == "worst" and len(sharp.trace) == 4 and np.all(np.diff(sharp.trace) >= 0)


def _fresh_results() -> dict[str, Result]:
    model, data = tiny_mlp(), mlp_data(16)
    return {"eigen": hessian_eigenvalues(model, CE, data, k=2, **QUIET),
            "trace": hessian_trace(model, CE, data, n_samples=6, **QUIET),
            "density": hessian_density(model, CE, data, n_iter=5, n_runs=2, **QUIET),
            "layers": layer_curvature(model, CE, data, max_iter=20, n_trace_samples=8, **QUIET),
            "sharpness": sharpness(model, CE, data, rho=0.05, kind="average", n_samples=3)}


def test_fresh_results_round_trip_with_settings_and_provenance(tmp_path: Path) -> None:
    """Every fresh result carries provenance() (today's versions) in its settings, and save -> load
    (Class.load and sharpscope.load) gives back the same settings and the same table."""
    for name, res in _fresh_results().items():
        assert res.provenance == provenance() == res.settings["provenance"], name
        path = res.save(tmp_path / f"{name}.nc")
        for back in (type(res).load(path), sharpscope.load(path)):
            assert type(back) is type(res) and back.settings == res.settings, name
            pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe(), check_dtype=False)


def test_layer_curvature_result_reads_like_its_table_and_old_aliases_work(tmp_path: Path) -> None:
    """layer_curvature returns a LayerCurvatureResult that indexes like the 0.1 DataFrame; the 0.1
    save_layer_curvature accepts it or a bare DataFrame with attrs, and load_layer_curvature reads both."""
    res = layer_curvature(tiny_mlp(), CE, mlp_data(16), max_iter=20, n_trace_samples=8, **QUIET)
    assert len(res) == 4 and list(res.columns)[:3] == ["layer", "shape", "numel"]
    assert res.loc[0, "layer"] == "0.weight" and res["numel"].sum() == 5 * 8 + 8 + 8 * 3 + 3
    frame = res.to_dataframe()
    frame.attrs = {"settings": dict(res.settings)}
    for i, obj in enumerate((res, frame)):
        back = load_layer_curvature(save_layer_curvature(obj, tmp_path / f"l{i}.nc"))
        assert back.settings == res.settings
        pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe(), check_dtype=False)


def test_damaged_file_of_a_known_kind_is_one_line(tmp_path: Path) -> None:
    """A netCDF file that says "hessian_eigenvalues" (or "sharpness") but lacks the variables: one
    UserInputError naming the file, not a KeyError."""
    import xarray as xr

    for cls in (EigenResult, SharpnessResult, TraceResult, DensityResult):
        path = write_dataset(xr.Dataset({"other": ("x", np.zeros(2))}), tmp_path / f"{cls.KIND}.nc", cls.KIND,
                             {"settings": {}})
        for load in (cls.load, sharpscope.load):
            with pytest.raises(UserInputError, match="cannot be read back") as info:
                load(path)
            assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Bad input (issue 11, section 4)
# ---------------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_k_above_the_parameter_count_is_one_line() -> None:
    """k = dim + 1 (75 parameters) for Lanczos and for the PyHessian backend: one UserInputError that
    names the count and the largest allowed k."""
    model, data = tiny_mlp(), mlp_data(16)
    dim = sum(p.numel() for p in model.parameters())
    backends = ["sharpscope"] + (["pyhessian"] if _has_pyhessian() else [])
    for backend in backends:
        with pytest.raises(UserInputError) as info:
            hessian_eigenvalues(model, CE, data, k=dim + 1, backend=backend, **QUIET)
        assert f"k <= {dim}" in _one_line(info)


def test_density_steps_above_the_dimension_or_the_cap_are_refused() -> None:
    """n_iter larger than the side of the Hessian (75) is refused saying what to use; on a model with
    more parameters than the cap, n_iter above MAX_SLQ_STEPS is refused too (both before any product)."""
    model, data = tiny_mlp(), mlp_data(16)
    assert sum(p.numel() for p in model.parameters()) == 75
    for backend in ["sharpscope"] + (["pyhessian"] if _has_pyhessian() else []):
        with pytest.raises(UserInputError) as info:
            hessian_density(model, CE, data, n_iter=76, backend=backend, **QUIET)
        assert "n_iter <= 75" in _one_line(info)
    wide = nn.Linear(40, 30)  # 1230 parameters > MAX_SLQ_STEPS
    x, y = torch.randn(8, 40), torch.randint(0, 30, (8,))
    assert sum(p.numel() for p in wide.parameters()) > MAX_SLQ_STEPS
    with pytest.raises(UserInputError) as info:
        hessian_density(wide, CE, (x, y), n_iter=MAX_SLQ_STEPS + 1, **QUIET)
    assert "cap" in _one_line(info)


def _analyses() -> dict[str, object]:
    run = {"eigen": lambda m, d: hessian_eigenvalues(m, CE, d, **QUIET),
           "trace": lambda m, d: hessian_trace(m, CE, d, n_samples=6, **QUIET),
           "density": lambda m, d: hessian_density(m, CE, d, n_iter=4, **QUIET),
           "layers": lambda m, d: layer_curvature(m, CE, d, max_iter=5, **QUIET),
           "sharpness": lambda m, d: sharpness(m, CE, d, steps=2),
           "sharpness_avg": lambda m, d: sharpness(m, CE, d, kind="average", n_samples=2)}
    if _has_pyhessian():
        run["pyhessian_eigen"] = lambda m, d: hessian_eigenvalues(m, CE, d, backend="pyhessian", **QUIET)
        run["pyhessian_trace"] = lambda m, d: hessian_trace(m, CE, d, n_samples=4, backend="pyhessian", **QUIET)
    return run


def test_non_finite_weights_are_refused_naming_the_tensor() -> None:
    """A NaN in 2.weight and an inf in 0.bias: every analysis refuses up front with one line naming both
    tensors (0.1 raised FloatingPointError tracebacks from inside the products)."""
    model, data = tiny_mlp(), mlp_data(16)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
        model[0].bias[1] = float("inf")
    for name, run in _analyses().items():
        with pytest.raises(UserInputError) as info:
            run(model, data)
        text = _one_line(info)
        assert "0.bias" in text and "2.weight" in text, name


def test_model_that_cannot_run_on_the_data_is_one_line() -> None:
    """The 5-input MLP on 7 features per example: every analysis says so in one line (shape named)
    before any long work, instead of a matmul RuntimeError traceback."""
    model = tiny_mlp()
    data = (torch.randn(16, 7, dtype=torch.float64), torch.randint(0, 3, (16,)))
    for name, run in _analyses().items():
        with pytest.raises(UserInputError) as info:
            run(model, data)
        assert "cannot run on this data" in _one_line(info) and "(7,)" in str(info.value), name


def _has_pyhessian() -> bool:
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        return False
    return True
