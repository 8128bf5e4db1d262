"""Model zoo: ``build_model(name, num_classes, **kwargs)``.

These are conveniences (the paper's architectures and small models for the embedded digits data);
every analysis and the training loop work with any ``nn.Module``. A model built here is described
by its *spec* ``{"name", "num_classes", "kwargs"}``, which a checkpoint stores so that
:func:`sharpscope.load_checkpoint` can rebuild the model without the user's code.

Models of other libraries, built offline (optional extras, imported only when used):

* ``build_model("timm:NAME", num_classes)``: ``timm.create_model(NAME, pretrained=False, num_classes=...)``
  (``pip install timm``);
* :func:`hf_model`: a Hugging Face ``transformers`` model from a ``save_pretrained`` folder or a config
  (``pip install 'sharpscope[hf]'``), see :mod:`sharpscope.models.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import _validate
from ..errors import UserInputError
from .hf import HF_TASKS, hf_model
from .resnet_cifar import CifarResNet
from .small import MLP, SmallCNN
from .vgg import VGG
from .vit import ViT
from .wide_resnet import WideResNet

__all__ = ["MODEL_NAMES", "TIMM_PREFIX", "build_model", "model_spec", "hf_model", "HF_TASKS", "CifarResNet", "VGG",
           "ViT", "WideResNet", "MLP", "SmallCNN"]


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(num_classes: int, **kwargs: Any) -> nn.Module:
        return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)
    return make


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet44": _resnet(44),
    "resnet56": _resnet(56),
    "resnet110": _resnet(110),
    "vgg16_bn": lambda num_classes, **kw: VGG(num_classes=num_classes, **kw),
    "vit": lambda num_classes, **kw: ViT(num_classes=num_classes, **kw),
    "wrn28_10": lambda num_classes, **kw: WideResNet(depth=28, widen_factor=10, num_classes=num_classes, **kw),
    "mlp": lambda num_classes, **kw: MLP(num_classes=num_classes, **kw),
    "cnn": lambda num_classes, **kw: SmallCNN(num_classes=num_classes, **kw),
}

#: The names :func:`build_model` accepts (case, ``-`` and ``_`` are ignored: ``"ResNet-20"`` works), besides
#: ``timm:NAME`` (:data:`TIMM_PREFIX`).
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
#: ``build_model("timm:NAME", ...)`` builds timm's model ``NAME`` (untrained: nothing is downloaded).
TIMM_PREFIX = "timm:"


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(name): name for name in _BUILDERS}


def canonical_model_name(name: str) -> str:
    """Return the canonical spelling of a model name, or raise :class:`UserInputError` listing them.

    ``timm:NAME`` is kept as given (timm's own names are case-sensitive), with the prefix in lower case.
    """
    timm_name = _timm_name(name)
    if timm_name is not None:
        return TIMM_PREFIX + timm_name
    if not isinstance(name, str) or _key(name) not in _BY_KEY:
        raise UserInputError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)} or timm:NAME")
    return _BY_KEY[_key(name)]


def _timm_name(name: Any) -> str | None:
    """``NAME`` of ``"timm:NAME"``, None for any other name; an empty ``NAME`` is refused."""
    if not isinstance(name, str) or not name.lower().startswith(TIMM_PREFIX):
        return None
    timm_name = name[len(TIMM_PREFIX):].strip()
    if not timm_name:
        raise UserInputError(f"model {name!r} names no timm model; write timm:NAME, e.g. timm:resnet18")
    return timm_name


def _timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)``, timm imported here."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 (a broken install fails with any error, e.g. a torchvision mismatch)
        reason = " ".join(str(exc).split())[:160]
        raise UserInputError(f"model timm:{name} needs timm, which cannot be imported here ({type(exc).__name__}: "
                             f"{reason}); pip install timm (with a torchvision matching this torch)") from None
    if not timm.is_model(name):
        raise UserInputError(f"timm has no model {name!r}; list them with timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def build_model(name: str, num_classes: int, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: one of :data:`MODEL_NAMES`: ``resnet20/32/44/56/110`` (CIFAR ResNets, option-A shortcuts),
            ``vgg16_bn`` (GAP + one linear head), ``vit`` (the ZSharp paper's CIFAR ViT),
            ``wrn28_10`` (WideResNet-28-10), ``mlp`` and ``cnn`` (small models for 8x8 digits); or
            ``timm:NAME``, timm's model ``NAME`` built with ``pretrained=False`` (timm must be importable).
        num_classes: size of the output layer (>= 1).
        seed: seed of the initial weights (drawn from a forked RNG, so the global one is untouched);
            ``None`` draws them from torch's global generator, as ``nn.Module`` constructors do.
        **kwargs: passed to the model class, e.g. ``in_channels=1``, ``image_size=64`` (ViT),
            ``in_features=64`` / ``hidden=(64, 64)`` (MLP), ``width=16``.

    The returned module carries its spec as ``model.sharpscope_spec`` (see :func:`model_spec`).

    Raises:
        UserInputError: unknown name, bad ``num_classes`` or keyword arguments the model does not take.
    """
    canonical = canonical_model_name(name)
    num_classes = _validate.positive_int(num_classes, "num_classes")
    _check_sizes(kwargs)
    timm_name = _timm_name(canonical)
    builder = _BUILDERS[canonical] if timm_name is None else (lambda n, **kw: _timm_model(timm_name, n, **kw))
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            model = builder(num_classes, **kwargs)
    except UserInputError:
        raise
    except TypeError as exc:
        raise UserInputError(f"bad keyword arguments for model {canonical!r}: {exc}") from None
    except ValueError as exc:
        raise UserInputError(f"model {canonical!r}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise UserInputError(f"model {canonical!r} with {num_classes} classes and {kwargs or 'default sizes'} is "
                             "too large to allocate here; choose smaller sizes") from None
    # Lets fit() store the spec in checkpoints without being told how the model was built.
    model.sharpscope_spec = model_spec(canonical, num_classes, **kwargs)
    return model


#: Keyword arguments of the models that are sizes: integers >= 1 (``hidden`` is a list of them).
_SIZE_KWARGS = ("in_channels", "in_features", "width", "widen_factor", "image_size", "patch_size", "dim",
                "depth", "heads", "mlp_dim")


def _check_sizes(kwargs: dict[str, Any]) -> None:
    """Refuse a size that is not a positive integer before a layer is built from it."""
    for key in _SIZE_KWARGS:
        if key in kwargs:
            _validate.positive_int(kwargs[key], key)
    if "hidden" in kwargs:
        hidden = kwargs["hidden"]
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (list, tuple)):
            raise UserInputError(f"hidden must be a list of layer widths, e.g. (64, 64); got {hidden!r}")
        for width in hidden:
            _validate.positive_int(width, "each hidden width")


def model_spec(name: str, num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """The spec a checkpoint stores to rebuild ``build_model(name, num_classes, **kwargs)``."""
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return {"name": canonical_model_name(name), "num_classes": int(num_classes), "kwargs": plain}
