"""The one result protocol, and self-describing result files (xarray Dataset in netCDF + JSON settings).

Every analysis returns a :class:`Result`: ``.to_dataframe()`` (tidy, for seaborn), ``.save(path)``,
``Class.load(path)``, and ``.settings`` holding the settings, seeds, model/data identity and
``settings["provenance"]`` (versions that made it, :func:`provenance`). Each result class has a
``KIND`` stored in its file; :func:`load_result` (``sharpscope.load``) opens any result file by it.

Every analysis result stores its numbers together with the coordinates, settings, seeds and the
identity of the model and data, so a figure can be redrawn from the file alone. No pickle: files
are netCDF (written with scipy's netCDF3 writer, so no extra dependency) and the metadata is JSON.
Tables (pandas DataFrames) are stored the same way, one variable per column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Iterator, Sequence
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


def provenance() -> dict[str, str]:
    """What made a result: sharpscope, torch and Python versions (stored in ``settings["provenance"]``)."""
    from .._version import __version__

    return {"sharpscope": __version__, "torch": torch.__version__, "python": platform.python_version()}


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
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"result file not found: {path}")
    try:
        ds = xr.open_dataset(path, engine="scipy")
    except Exception as exc:  # any failure here means "not one of our result files"
        raise UserInputError(f"{path} is not a sharpscope result file ({exc.__class__.__name__})") from exc
    try:
        return json.loads(ds.attrs[_META_KEY])["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{path} is not a sharpscope result file (no sharpscope header)") from exc
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


@contextlib.contextmanager
def damaged_result_file(path: str | os.PathLike[str], kind: str) -> Iterator[None]:
    """Turn a missing or malformed field met while rebuilding a result from ``path`` into one line.

    A netCDF file that carries a sharpscope ``kind`` but lacks a variable or a metadata entry (damaged,
    or written by another program) would otherwise end in a ``KeyError`` traceback.
    """
    try:
        yield
    except UserInputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else f"{exc.__class__.__name__}: {exc}"
        raise UserInputError(f"{path} is a {kind!r} result file but cannot be read back ({what}); it is damaged "
                             "or was not written by sharpscope: recompute it") from None


def require_variables(ds: xr.Dataset, names: Sequence[str], path: str | os.PathLike[str], what: str) -> None:
    """Refuse, in one line, a result file of the right kind that lacks some of ``names``."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise UserInputError(f"{path} is not a complete {what} file: it lacks {', '.join(map(repr, missing))}; "
                             "write it again with this version")


_RESULT_CLASSES: dict[str, type[Result]] = {}


class Result:
    """The protocol every analysis result follows.

    Subclasses set ``KIND`` (the tag in the file; registering the class for :func:`load_result`) and
    implement :meth:`to_dataframe`, :meth:`save` and :meth:`load`. ``settings`` holds everything that
    determines the numbers, plus ``"provenance"``.
    """

    KIND: ClassVar[str]
    settings: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("KIND")
        if isinstance(kind, str):
            _RESULT_CLASSES[kind] = cls

    def to_dataframe(self) -> pd.DataFrame:
        """The numbers as a tidy DataFrame."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to ``path`` (netCDF), atomically."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Result:
        """Read a file written by :meth:`save` (refuses other kinds with a clear message)."""
        raise NotImplementedError

    @property
    def provenance(self) -> dict[str, Any]:
        """Versions that produced the result (empty for files written before sharpscope 0.2)."""
        return dict(self.settings.get("provenance", {}))


def result_classes() -> dict[str, type[Result]]:
    """``KIND -> class`` of every result class imported so far."""
    return dict(_RESULT_CLASSES)


def load_result(path: str | os.PathLike[str]) -> Result:
    """Open any sharpscope result file as its result class, chosen by the ``kind`` stored inside."""
    kind = result_kind(path)
    cls = _RESULT_CLASSES.get(kind)
    if cls is None:
        known = ", ".join(sorted(_RESULT_CLASSES))
        raise UserInputError(f"{path} holds a {kind!r} result, which this version cannot read (known: {known}); "
                             "upgrade sharpscope")
    with damaged_result_file(path, kind):
        return cls.load(path)


_R = TypeVar("_R", bound="DatasetResult")


class DatasetResult(Result):
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


_T = TypeVar("_T", bound="TableResult")


class TableResult(Result):
    """Base of a result that is one tidy table (one row per layer, say) plus its settings.

    For code written against the DataFrames these analyses returned before, the result also reads
    like its table: ``res["layer"]``, ``len(res)``, ``res.columns``, ``res.loc[...]`` are the table's.
    """

    KIND: ClassVar[str]

    def __init__(self, table: pd.DataFrame, settings: dict[str, Any]) -> None:
        self.table = table.reset_index(drop=True)
        self.settings = dict(settings)

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of the table."""
        return self.table.copy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table (netCDF, one variable per column) with the settings, atomically."""
        return write_table(self.table, path, self.KIND, {"settings": self.settings})

    @classmethod
    def load(cls: type[_T], path: str | os.PathLike[str]) -> _T:
        """Read a file written by :meth:`save` (or by sharpscope 0.1's ``save_*`` table writers)."""
        table, meta = read_table(path, cls.KIND)
        settings = meta.get("settings", {k: v for k, v in meta.items() if k != "settings"})
        return cls(table, settings)

    def __getitem__(self, key: Any) -> Any:
        return self.table[key]

    def __len__(self) -> int:
        return len(self.table)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("table", "settings"):
            raise AttributeError(name)
        return getattr(self.table, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.table)} rows)\n{self.table!r}"
