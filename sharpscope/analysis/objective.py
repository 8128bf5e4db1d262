"""How a batch becomes a loss: the objectives (loss adapters) every analysis and :func:`fit` share.

A *batch* is a ``(inputs, targets)`` tuple, a dict of tensors (``input_ids``, ``attention_mask``,
``labels``, ``pixel_values``, ...) or anything a user's ``loss_fn(model, batch)`` understands. An
:class:`Objective` splits the loss of one batch into the forward pass (:meth:`Objective.outputs`), the
loss of those outputs (:meth:`Objective.loss`, a mean over the batch's targets) and the number of targets
that mean is over (:meth:`Objective.count`). The full-data loss every analysis differentiates is

    L(w) = sum_b c_b * loss_b(w) / sum_b c_b,         c_b = count(batch b),

the mean over *all targets* whatever the batch sizes or padding: for a classifier ``c_b`` is the number
of examples, for a language model the number of target tokens that are not ``ignore_index``. With
:class:`TokenCrossEntropy` this is exactly the token-level cross-entropy of the concatenated data,
``sum_{tokens} -log p(t_i | t_<i) / #tokens`` (the quantity Hugging Face reports per batch as ``.loss``).

Adapters:

- :class:`ClassificationLoss`: ``loss_fn(model(x), y)``, today's convention (default cross-entropy).
- :class:`TokenCrossEntropy`: next-token cross-entropy of a causal language model with ``ignore_index``.
- :class:`ModelOutputLoss`: the model computes its own loss (``model(**batch).loss``, Hugging Face).
- :class:`BatchLoss`: any ``fn(model, batch)`` returning a mean loss.

:func:`as_objective` turns every ``loss_fn`` argument the public API accepts into one of these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import UserInputError

#: Keys tried, in order, for the model input of a dict batch of a classifier.
INPUT_KEYS = ("pixel_values", "inputs", "input", "x", "input_ids", "images", "image")
#: Keys tried, in order, for the targets of a dict batch.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (tuple, list, dict or tensor), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def _key(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> str:
    for key in keys:
        if key in batch:
            return key
    raise UserInputError(f"the batch has no {what} (looked for {', '.join(keys)}; it has {', '.join(map(str, batch))})")


def _logits(outputs: Any) -> torch.Tensor:
    """A model's output tensor: the tensor itself, or ``.logits`` of a Hugging Face output object."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise UserInputError(f"the model returned {type(outputs).__name__}, not a tensor nor an object with "
                             ".logits; pass a loss_fn(model, batch) (sharpscope.BatchLoss) for such a model")
    return logits


def _scalar(loss: Any, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserInputError(f"{where} must return a scalar (mean-reduced) loss; got shape {shape}. "
                             "Use reduction='mean'.")
    return loss


class Objective:
    """The loss of one batch, split into forward pass, loss of the outputs and number of targets."""

    name = "objective"
    #: Whether :meth:`loss` is a differentiable function of a tensor ``outputs`` (the GGN needs it).
    outputs_are_logits = True

    def outputs(self, model: Callable[..., Any], batch: Any) -> Any:
        """The forward pass of ``model`` (a module, or a callable with its signature) on ``batch``."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """Scalar mean of the loss over the batch's targets."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """Number of targets the batch's mean loss is over (its weight in the full-data mean)."""
        raise NotImplementedError

    def correct(self, outputs: Any, batch: Any) -> torch.Tensor | None:
        """Number of correct argmax predictions, or None when accuracy has no meaning here."""
        return None

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        return self.loss(self.outputs(model, batch), batch)

    def describe(self) -> str:
        """Stable text naming the objective and its settings (stored in results, compared on resume)."""
        return repr(self)


class ClassificationLoss(Objective):
    """``loss_fn(model(x), y)``: a classifier (or any model with one input and one target tensor).

    ``batch`` is ``(x, y)`` or a dict with a target key (``labels``) and one input key (``pixel_values``,
    ``inputs``, ``x``, ``input_ids``, ...). ``count`` is the number of examples, so a mean-reduced
    ``loss_fn`` gives the mean over all examples.
    """

    name = "classification"

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            return batch[_key(batch, INPUT_KEYS, "input")], batch[_key(batch, LABEL_KEYS, "targets")]
        return batch[0], batch[1]

    def outputs(self, model: Callable[..., Any], batch: Any) -> Any:
        return _logits(model(self._split(batch)[0]))

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        return _scalar(self.loss_fn(outputs, self._split(batch)[1]), "loss_fn")

    def count(self, batch: Any) -> int:
        return len(self._split(batch)[1])

    def targets(self, batch: Any) -> torch.Tensor:
        """The batch's target tensor."""
        return self._split(batch)[1]

    def correct(self, outputs: Any, batch: Any) -> torch.Tensor | None:
        """Correct argmax predictions of an ``(N, C)`` output against integer targets (None otherwise:
        ``count`` counts examples, so per-pixel or per-token counts would not be an accuracy)."""
        y = self._split(batch)[1]
        if outputs.dim() == 2 and y.dim() == 1 and not torch.is_floating_point(y):
            return (outputs.argmax(1) == y).sum()
        return None

    def __repr__(self) -> str:
        return repr(self.loss_fn)

    def describe(self) -> str:
        """The loss module's repr, or a function's qualified name (no memory address)."""
        if isinstance(self.loss_fn, nn.Module):
            return repr(self.loss_fn)
        fn = self.loss_fn
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class TokenCrossEntropy(Objective):
    """Next-token cross-entropy of a language model, averaged over the target tokens.

    ``batch``: a dict with ``input_ids`` and optionally ``attention_mask`` and ``labels``, or a tuple
    ``(input_ids, labels)``. Without ``labels`` the targets are ``input_ids`` with padding
    (``attention_mask == 0``) set to ``ignore_index``. With ``shift`` (a causal LM) the logits at
    position ``t`` predict the target at ``t + 1``. ``loss = sum_i CE(logits_i, t_i) / count`` over
    the targets ``t_i != ignore_index``; ``count`` is their number, so batches with more real tokens
    weigh more and padding weighs nothing.
    """

    name = "token_cross_entropy"

    def __init__(self, ignore_index: int = -100, shift: bool = True) -> None:
        self.ignore_index = int(ignore_index)
        self.shift = bool(shift)

    def _inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(batch, Mapping):
            return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        return (batch[0],), {}

    def targets(self, batch: Any) -> torch.Tensor:
        """The target token ids, ``ignore_index`` where nothing is predicted (shifted when ``shift``)."""
        if isinstance(batch, Mapping):
            labels = batch.get("labels")
            if labels is None:
                labels = batch[_key(batch, ("input_ids",), "input_ids")]
                mask = batch.get("attention_mask")
                if mask is not None:
                    labels = labels.masked_fill(mask == 0, self.ignore_index)
        else:
            labels = batch[1]
        return labels[..., 1:] if self.shift else labels

    def outputs(self, model: Callable[..., Any], batch: Any) -> Any:
        args, kwargs = self._inputs(batch)
        return _logits(model(*args, **kwargs))

    def _aligned_targets(self, batch: Any, device: torch.device) -> torch.Tensor:
        """Targets for every logit position (shifted: position ``t`` predicts ``t + 1``, the last nothing),
        so the logits are used whole: slicing off the last position would copy them."""
        targets = self.targets(batch).to(device)
        if self.shift:
            targets = F.pad(targets, (0, 1), value=self.ignore_index)
        return targets

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        logits = outputs.reshape(-1, outputs.shape[-1])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        targets = self._aligned_targets(batch, outputs.device).reshape(-1)
        total = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        return total / max(self.count(batch), 1)

    def count(self, batch: Any) -> int:
        return int((self.targets(batch) != self.ignore_index).sum())

    def correct(self, outputs: Any, batch: Any) -> torch.Tensor | None:
        targets = self._aligned_targets(batch, outputs.device)
        return ((outputs.argmax(-1) == targets) & (targets != self.ignore_index)).sum()

    def __repr__(self) -> str:
        return f"TokenCrossEntropy(ignore_index={self.ignore_index}, shift={self.shift})"


def _is_causal_lm(model: Any) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


class ModelOutputLoss(Objective):
    """The model computes its own loss: ``model(**batch).loss`` (Hugging Face models given ``labels``).

    ``count``: for 2-D (token) labels, the labels that are not ``ignore_index`` (after the shift of a
    causal LM, which Hugging Face applies inside the model); for 1-D labels, their number. Use
    :meth:`for_model` to detect the shift from the model class.
    """

    name = "model_loss"
    outputs_are_logits = False

    def __init__(self, shift: bool = False, ignore_index: int = -100) -> None:
        self.shift = bool(shift)
        self.ignore_index = int(ignore_index)

    @classmethod
    def for_model(cls, model: Any, ignore_index: int = -100) -> ModelOutputLoss:
        """The adapter for ``model``: shifted token counts for a causal language model."""
        return cls(shift=_is_causal_lm(model), ignore_index=ignore_index)

    def outputs(self, model: Callable[..., Any], batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            raise UserInputError("the model's own loss needs dict batches (input_ids, labels, ...); "
                                 f"got {type(batch).__name__}")
        if "labels" not in batch:
            raise UserInputError("the model's own loss needs 'labels' in every batch")
        return model(**batch)

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise UserInputError(f"the model returned no .loss ({type(outputs).__name__}); give 'labels' in the "
                                 "batches or use loss='lm' (token cross-entropy)")
        return _scalar(loss, "the model's .loss")

    def count(self, batch: Any) -> int:
        labels = batch["labels"]
        if labels.dim() < 2:
            return len(labels)
        if self.shift:
            labels = labels[..., 1:]
        return int((labels != self.ignore_index).sum())

    def correct(self, outputs: Any, batch: Any) -> torch.Tensor | None:
        labels = batch["labels"]
        logits = getattr(outputs, "logits", None)
        if labels.dim() != 1 or not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            return None
        return (logits.argmax(1) == labels).sum()

    def __repr__(self) -> str:
        return f"ModelOutputLoss(shift={self.shift}, ignore_index={self.ignore_index})"


class BatchLoss(Objective):
    """A user's ``fn(model, batch)`` returning the mean loss of the batch.

    ``count(batch)`` (default: the leading size of the first tensor in the batch) is the number of
    targets that mean is over; give your own when it differs (e.g. padded tokens).
    """

    name = "batch_loss"
    outputs_are_logits = False

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], count: Callable[[Any], int] | None = None) -> None:
        if not callable(fn):
            raise TypeError("fn must be callable as fn(model, batch)")
        self.fn = fn
        self._count = count

    def outputs(self, model: Callable[..., Any], batch: Any) -> Any:
        return _scalar(self.fn(model, batch), "loss_fn(model, batch)")

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        return outputs

    def count(self, batch: Any) -> int:
        if self._count is not None:
            return int(self._count(batch))
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise UserInputError("cannot tell the batch size of a batch without a batched tensor; "
                                 "give BatchLoss(fn, count=...)")
        return int(tensor.shape[0])

    def __repr__(self) -> str:
        return f"BatchLoss({getattr(self.fn, '__qualname__', repr(self.fn))})"

    def describe(self) -> str:
        return f"BatchLoss({getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', repr(self.fn))})"


_NAMED: dict[str, Callable[[Any], Objective]] = {
    "cross_entropy": lambda model: ClassificationLoss(),
    "classification": lambda model: ClassificationLoss(),
    "lm": lambda model: TokenCrossEntropy(),
    "token_cross_entropy": lambda model: TokenCrossEntropy(),
    "hf": lambda model: ModelOutputLoss.for_model(model),
    "model_loss": lambda model: ModelOutputLoss.for_model(model),
}


def _takes_model_first(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "model"


def as_objective(loss_fn: Any, model: Any = None) -> Objective:
    """The :class:`Objective` for any ``loss_fn`` the public API accepts.

    - an :class:`Objective`: itself; ``None``: cross-entropy classification;
    - a name: ``"cross_entropy"``/``"classification"``, ``"lm"``/``"token_cross_entropy"``,
      ``"hf"``/``"model_loss"`` (the shift of a causal LM is read from ``model``);
    - a callable whose first parameter is named ``model``: ``BatchLoss(fn)`` (``fn(model, batch)``);
    - any other callable: ``ClassificationLoss(fn)``, i.e. ``fn(outputs, targets)``.
    """
    if isinstance(loss_fn, Objective):
        return loss_fn
    if loss_fn is None:
        return ClassificationLoss()
    if isinstance(loss_fn, str):
        key = loss_fn.strip().lower().replace("-", "_")
        if key not in _NAMED:
            raise UserInputError(f"unknown loss {loss_fn!r}; choose one of {', '.join(sorted(_NAMED))} "
                                 "or pass a callable")
        return _NAMED[key](model)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) or loss_fn(model, batch), "
                        f"a name or a sharpscope Objective; got {type(loss_fn).__name__}")
    if not isinstance(loss_fn, nn.Module) and _takes_model_first(loss_fn):
        return BatchLoss(loss_fn)
    return ClassificationLoss(loss_fn)


def functional_model(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``f(*args, **kwargs)``: ``module``'s forward with ``tensors`` in place of its parameters/buffers."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, dict(tensors), args, kwargs)

    return forward
