"""Hugging Face ``transformers`` models, built or loaded offline: :func:`hf_model`.

``transformers`` is an optional extra (``pip install 'sharpscope[hf]'``), imported only when a function
here is called. Nothing is ever downloaded: a folder is read with ``local_files_only=True``, a config
is built locally, and code shipped with a model (``trust_remote_code``) is refused.

The model returned runs like any other with every analysis; its loss is the model's own ``.loss``
(``loss_fn="hf"``) or token cross-entropy (``loss_fn="lm"``), see :mod:`sharpscope.analysis.objective`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError

#: ``task`` -> the ``transformers`` auto class that builds the model with that head.
HF_TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "base": "AutoModel",
}
_INSTALL = "pip install 'sharpscope[hf]' (or pip install transformers)"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise UserInputError(f"Hugging Face models need transformers, which cannot be imported here ({exc}); "
                             f"{_INSTALL}") from None
    return transformers


def hf_model(source: Any, task: str | None = None, *, seed: int | None = None, **config_overrides: Any) -> nn.Module:
    """A ``transformers`` model, offline, in eval mode.

    Args:
        source: a ``save_pretrained`` folder (``config.json`` and its weights: the trained model is loaded),
            a folder or ``config.json`` file without weights, a ``transformers.PretrainedConfig`` or a dict
            with ``"model_type"`` (a freshly initialised model is built).
        task: which head (one of :data:`HF_TASKS`, e.g. ``"causal-lm"``, ``"sequence-classification"``,
            ``"image-classification"``); default: the class the config names in ``architectures`` (set by
            ``save_pretrained``), which a bare config may lack: then ``task`` is required.
        seed: seed of a freshly built model's initial weights (from a forked RNG); ``None`` uses the global one.
        **config_overrides: config attributes to change, e.g. ``num_labels=10``.

    The model carries ``model.sharpscope_hf = {"source", "class", "pretrained"}``.

    Raises:
        UserInputError: transformers missing, a path that is not a config or model folder, an unknown
            task or architecture, or weights that do not fit the config.
    """
    transformers = _transformers()
    config, folder = _config_of(source, transformers, config_overrides)
    cls = _model_class(config, task, transformers)
    pretrained = folder is not None and _has_weights(folder)
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            if pretrained:
                with _quiet(transformers):
                    model = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                                trust_remote_code=False)
            else:
                model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserInputError(f"cannot build {cls.__name__} from {_describe(source)}: {_first_line(exc)}") from None
    model.eval()
    model.sharpscope_hf = {"source": _describe(source), "class": type(model).__name__, "pretrained": pretrained}
    return model


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar of transformers (sharpscope draws its own), restored afterwards."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__} config"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _has_weights(folder: Path) -> bool:
    from ..train.checkpoint import HF_WEIGHT_FILES

    return any((folder / name).is_file() for name in HF_WEIGHT_FILES)


def _config_of(source: Any, transformers: Any, overrides: dict[str, Any]) -> tuple[Any, Path | None]:
    """``(config, folder of the weights or None)`` of any ``source`` :func:`hf_model` takes."""
    if isinstance(source, transformers.PretrainedConfig):
        config, folder = source.__class__.from_dict(source.to_dict()), None
    elif isinstance(source, dict):
        config, folder = _config_from_dict(dict(source), transformers, "the dict given"), None
    elif isinstance(source, (str, os.PathLike)):
        config, folder = _config_from_path(Path(source), transformers)
    else:
        raise UserInputError(f"a Hugging Face model comes from a folder, a config.json, a PretrainedConfig or a "
                             f"dict; got {type(source).__name__}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config, folder


def _config_from_path(path: Path, transformers: Any) -> tuple[Any, Path | None]:
    if path.is_dir():
        file, folder = path / "config.json", path
    else:
        file, folder = path, None
    if not file.is_file():
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise UserInputError(f"Hugging Face model {str(path)!r} {what}; give a save_pretrained folder or its "
                             f"config.json (nothing is downloaded)")
    try:
        values = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{str(file)!r} is not a readable JSON config: {_first_line(exc)}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{str(file)!r} is not a config (a JSON object with model_type)")
    return _config_from_dict(values, transformers, repr(str(file))), folder


def _config_from_dict(values: dict[str, Any], transformers: Any, where: str) -> Any:
    if values.get("auto_map"):
        raise UserInputError(f"{where} needs code shipped with the model (auto_map); sharpscope never runs it — "
                             f"build the model yourself and pass it to the Python API")
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise UserInputError(f"{where} has no model_type; it is not a transformers config")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{where}: unknown or malformed transformers config (model_type {model_type!r}): "
                             f"{_first_line(exc)}") from None


def _model_class(config: Any, task: str | None, transformers: Any) -> Any:
    """The class to build: the auto class of ``task``, else the config's own architecture."""
    if task is not None:
        if task not in HF_TASKS:
            raise UserInputError(f"unknown task {task!r}; choose one of: {', '.join(HF_TASKS)}")
        return getattr(transformers, HF_TASKS[task])
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise UserInputError(f"the config does not say which model to build (no known architectures entry); give "
                         f"task= (--task), one of: {', '.join(HF_TASKS)}")


def is_hf_model(model: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)
