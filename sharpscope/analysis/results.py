"""Self-describing result files: an xarray Dataset in netCDF with the settings as JSON attributes.

Every analysis result stores its numbers together with the coordinates, settings, seeds and the
identity of the model and data, so a figure can be redrawn from the file alone. No pickle: files
are netCDF (written with scipy's netCDF3 writer, so no extra dependency) and the metadata is JSON.
Tables (pandas DataFrames) are stored the same way, one variable per column.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .._io import atomic_output
from ..errors import UserInputError

FORMAT_VERSION = 1
_META_KEY = "sharpscope"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in result metadata")


def write_dataset(ds: xr.Dataset, path: str | os.PathLike[str], kind: str, metadata: dict[str, Any]) -> Path:
    """Write ``ds`` to ``path`` (netCDF) atomically with ``kind`` and ``metadata`` in its attributes."""
    ds = ds.copy()
    for name in list(ds.variables):
        if ds[name].dtype == np.int64:
            ds[name] = ds[name].astype(np.int32) if np.abs(ds[name].values).max(initial=0) < 2**31 \
                else ds[name].astype(np.float64)
    ds.attrs = {
        _META_KEY: json.dumps(
            {"kind": kind, "format_version": FORMAT_VERSION, "metadata": metadata}, default=_json_default
        )
    }
    with atomic_output(path) as tmp:
        ds.to_netcdf(tmp, engine="scipy")
    return Path(path)


def read_dataset(path: str | os.PathLike[str], kind: str | None = None) -> tuple[xr.Dataset, dict[str, Any]]:
    """Read a file written by :func:`write_dataset`; check its ``kind`` when given."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"result file not found: {path}")
    try:
        ds = xr.load_dataset(path, engine="scipy")
        header = json.loads(ds.attrs[_META_KEY])
    except Exception as exc:  # any failure here means "not one of our result files"
        raise UserInputError(f"{path} is not a sharpscope result file ({exc.__class__.__name__})") from exc
    if kind is not None and header.get("kind") != kind:
        raise UserInputError(f"{path} holds a {header.get('kind')!r} result, not {kind!r}")
    ds.attrs = {}
    return ds, header["metadata"]


def result_kind(path: str | os.PathLike[str]) -> str:
    """The ``kind`` tag stored in a result file (to dispatch on, e.g. when drawing figures)."""
    ds = xr.open_dataset(path, engine="scipy")
    try:
        return json.loads(ds.attrs[_META_KEY])["kind"]
    finally:
        ds.close()


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], kind: str, metadata: dict[str, Any]) -> Path:
    """Write a tidy DataFrame (one variable per column) as a self-describing netCDF file."""
    table = df.reset_index(drop=True).copy()
    for col in table.columns:
        if table[col].dtype == object or str(table[col].dtype) in ("string", "str"):
            table[col] = table[col].astype(str)
    ds = xr.Dataset.from_dataframe(table)
    meta = dict(metadata)
    meta["_columns"] = [str(c) for c in table.columns]
    return write_dataset(ds, path, kind, meta)


def read_table(path: str | os.PathLike[str], kind: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`write_table`, columns in their original order."""
    ds, meta = read_dataset(path, kind)
    columns = meta.pop("_columns")
    df = ds.to_dataframe().reset_index(drop=True)[columns]
    for col in df.columns:
        if str(df[col].dtype) in ("str", "string"):
            df[col] = df[col].astype(object)
    return df, meta


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (on the CPU, contiguous), for fingerprints."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short SHA-256 of all parameters and buffers (names, shapes, values): the model's identity."""
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str((tensor.numel(),)).encode())  # the flat shape: keeps existing fingerprints
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:16]


_R = TypeVar("_R", bound="DatasetResult")


class DatasetResult:
    """Base of a result that is one ``xarray.Dataset`` plus its settings, saved under ``KIND``.

    Subclasses set ``KIND`` and add their own accessors; the file holds the dataset with the
    settings as its metadata (:func:`write_dataset`).
    """

    KIND: ClassVar[str]

    def __init__(self, dataset: xr.Dataset, settings: dict[str, Any]) -> None:
        self.dataset = dataset
        self.settings = dict(settings)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result (netCDF with the settings as JSON), atomically."""
        return write_dataset(self.dataset, path, self.KIND, self.settings)

    @classmethod
    def load(cls: type[_R], path: str | os.PathLike[str]) -> _R:
        """Read a file written by :meth:`save` (refuses other result kinds with a clear message)."""
        ds, settings = read_dataset(path, cls.KIND)
        return cls(ds, settings)
