"""Sharpness numbers: the loss increase in a ball around the weights, worst case or on average.

For weights ``w``, loss ``L`` on the whole ``data`` and radius ``rho``
(Keskar et al. 2017; Foret et al. 2021; Andriushchenko et al., ICML 2023, "A modern look at the
relationship between sharpness and generalization"):

* worst case:    ``S_max(w) = max_{||T^-1 e|| <= rho} L(w + e) - L(w)``
* average case:  ``S_avg(w) = E_{e = T u, u uniform on the sphere ||u|| = rho} L(w + e) - L(w)``
  (a Gaussian draw rescaled to norm ``rho``).

``T = I`` for the plain variants; with ``adaptive=True`` ``T = diag(|w| + eta)`` elementwise, the
scale-invariant (adaptive) sharpness of Kwon et al. 2021 (ASAM) used by Andriushchenko et al. 2023
(``eta = 0``), so rescaling a ReLU layer by ``c`` and the next by ``1 / c`` does not change it.

The worst case is found by projected, normalised gradient ascent in ``u = T^-1 e``: start at the
SAM step ``u_0 = rho T g / ||T g||`` (a random point of the sphere if ``g = 0``), then
``u <- P(u + a T g(w + T u) / ||T g(w + T u)||)`` with ``P`` the projection onto ``||u|| <= rho``;
the step ``a`` starts at ``rho`` and is halved whenever a step fails to increase the loss (the
iterate then goes back to the best point). The result is a lower bound of ``S_max`` that is exact
for a quadratic with enough steps; ``steps + 1`` gradient passes over ``data``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .._progress import progress as _progress
from ..errors import UserInputError
from .batching import (
    Batch,
    as_batches,
    batch_weights,
    checked_loss,
    model_device,
    preserved_model_state,
    to_device,
)
from .results import model_fingerprint, read_dataset, write_dataset

KIND = "sharpness"


@dataclass
class SharpnessResult:
    """A sharpness number and how it was obtained.

    Attributes:
        kind: ``"worst"`` or ``"average"``.
        value: ``S_max`` (the best increase found) or the mean increase ``S_avg``.
        stderr: standard error of ``S_avg`` over the samples (NaN for the worst case).
        base_loss: ``L(w)``.
        perturbation_norm: ``||e||`` of the worst perturbation found (for the average case, the
            mean of ``||e||`` over the samples; equal to ``rho`` unless adaptive).
        scaled_norm: ``||T^-1 e||`` of it, at most ``rho`` (equals ``perturbation_norm`` unless adaptive).
        trace: the increase after each ascent step (worst case: best so far, ``steps + 1`` values)
            or for each sample (average case).
        settings: rho, adaptive, eta, ignore, steps/samples, seed, data size, model fingerprint.
    """

    kind: str
    value: float
    stderr: float
    base_loss: float
    perturbation_norm: float
    scaled_norm: float
    trace: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row: the number, its error, the norms and the main settings."""
        row = {"kind": self.kind, "rho": self.settings.get("rho"), "adaptive": self.settings.get("adaptive"),
               "value": self.value, "stderr": self.stderr, "base_loss": self.base_loss,
               "perturbation_norm": self.perturbation_norm, "scaled_norm": self.scaled_norm}
        return pd.DataFrame([row])

    def save(self, path: str | os.PathLike[str]) -> Path:
        ds = xr.Dataset({"trace": (("index",), np.asarray(self.trace, dtype=np.float64))})
        meta = {"kind": self.kind, "value": self.value, "stderr": self.stderr, "base_loss": self.base_loss,
                "perturbation_norm": self.perturbation_norm, "scaled_norm": self.scaled_norm,
                "settings": self.settings}
        return write_dataset(ds, path, KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SharpnessResult:
        ds, meta = read_dataset(path, KIND)
        nan = float("nan")
        return cls(meta["kind"], meta["value"], nan if meta["stderr"] is None else meta["stderr"],
                   meta["base_loss"], meta["perturbation_norm"], meta["scaled_norm"],
                   ds["trace"].values, meta["settings"])


class _Objective:
    """Full-data loss (and gradient) at ``w0 + T u`` for the chosen parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Sequence[Batch],
                 params: list[nn.Parameter], scale: list[torch.Tensor]) -> None:
        self.model, self.loss_fn, self.params, self.scale = model, loss_fn, params, scale
        device = model_device(model)
        self.batches = [to_device(b, device) for b in batches]
        self.weights = batch_weights(self.batches)
        self.base = [p.detach().clone() for p in params]

    @torch.no_grad()
    def _set(self, u: list[torch.Tensor] | None) -> None:
        torch._foreach_copy_(self.params, self.base)
        if u is not None:
            torch._foreach_add_(self.params, torch._foreach_mul(u, self.scale))

    def loss(self, u: list[torch.Tensor] | None) -> float:
        self._set(u)
        with torch.no_grad():
            total = sum(checked_loss(self.loss_fn(self.model(x), y)).double() * w
                        for (x, y), w in zip(self.batches, self.weights))
        return float(total)

    def loss_and_scaled_grad(self, u: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor]]:
        """``L(w0 + T u)`` and ``T * grad L`` (the gradient with respect to ``u``)."""
        self._set(u)
        total = 0.0
        grads = [torch.zeros_like(p) for p in self.params]
        for (x, y), w in zip(self.batches, self.weights):
            loss = checked_loss(self.loss_fn(self.model(x), y))
            g = torch.autograd.grad(loss * w, self.params, allow_unused=True)
            torch._foreach_add_(grads, [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, self.params)])
            total += float(loss.detach()) * w
        return total, torch._foreach_mul(grads, self.scale)


def _norm(ts: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in ts)))


def _check_positive(value: Any, name: str, integer: bool = False) -> None:
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "an integer" if integer else "a number"
        raise UserInputError(f"{name} must be {kind} > 0; got {value!r}")


def sharpness(model: nn.Module, loss_fn: Callable, data: Any, rho: float = 0.05, kind: str = "worst",
              adaptive: bool = False, *, steps: int = 20, n_samples: int = 20, eta: float = 0.0,
              ignore: str = "none", seed: int = 0, progress: bool = False) -> SharpnessResult:
    """Worst-case or average-case loss increase within radius ``rho`` (see the module docstring).

    Args:
        model: the network at ``w``; evaluated in eval mode and left exactly as found.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        data: one ``(inputs, targets)`` batch or an iterable of them (the loss is over all of it).
        rho: radius of the ball (in ``u = T^-1 e`` when adaptive), > 0.
        kind: ``"worst"`` (projected gradient ascent) or ``"average"`` (random directions).
        adaptive: scale the ball elementwise by ``T = |w| + eta`` (Kwon et al. 2021).
        steps: ascent steps for ``kind="worst"`` (each one forward/backward pass over ``data``).
        n_samples: random perturbations for ``kind="average"``.
        eta: offset of ``T`` in the adaptive variant (>= 0; 0 as Andriushchenko et al. 2023).
        ignore: ``"none"`` perturbs every trainable parameter; ``"biasbn"`` leaves tensors with
            ``ndim <= 1`` (biases, normalisation layers) fixed.
        seed: seed of the random draws (the average case, or the start when the gradient is zero).
        progress: show a progress bar.
    """
    _check_positive(rho, "rho")
    if kind not in ("worst", "average"):
        raise UserInputError(f"kind must be 'worst' or 'average'; got {kind!r}")
    if ignore not in ("none", "biasbn"):
        raise UserInputError(f"ignore must be 'none' or 'biasbn'; got {ignore!r}")
    _check_positive(steps, "steps", integer=True)
    _check_positive(n_samples, "n_samples", integer=True)
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.number)) or not math.isfinite(eta) or eta < 0:
        raise UserInputError(f"eta must be a number >= 0; got {eta!r}")
    batches = as_batches(data)
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and not (ignore == "biasbn" and p.dim() <= 1)]
    if not named:
        raise UserInputError("no parameter to perturb: the model has no trainable parameter "
                             "(left after ignore='biasbn')")
    rho = float(rho)
    settings = {"rho": rho, "adaptive": bool(adaptive), "eta": float(eta) if adaptive else None,
                "ignore": ignore, "seed": int(seed), "steps": int(steps) if kind == "worst" else None,
                "n_samples": int(n_samples) if kind == "average" else None,
                "n_examples": int(sum(len(x) for x, _ in batches)), "model_fingerprint": model_fingerprint(model),
                "parameters": [n for n, _ in named]}
    gen = torch.Generator().manual_seed(int(seed))

    def sphere() -> list[torch.Tensor]:
        z = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for _, p in named]
        return torch._foreach_mul(z, rho / _norm(z))

    with preserved_model_state(model, train=False):
        params = [p for _, p in named]
        scale = [(p.detach().abs() + eta) if adaptive else torch.ones_like(p) for p in params]
        obj = _Objective(model, loss_fn, batches, params, scale)
        if kind == "worst":
            base, g = obj.loss_and_scaled_grad(None)
            gnorm = _norm(g)
            u = torch._foreach_mul(g, rho / gnorm) if gnorm > 0 and math.isfinite(gnorm) else sphere()
            best_loss, grad = obj.loss_and_scaled_grad(u)
            best_u, step = u, rho
            trace = [best_loss - base]
            for _ in _progress(range(int(steps)), enabled=progress, desc="worst-case sharpness"):
                gnorm = _norm(grad)
                if not (gnorm > 0 and math.isfinite(gnorm)):
                    break
                cand = torch._foreach_add(best_u, torch._foreach_mul(grad, step / gnorm))
                cnorm = _norm(cand)
                if cnorm > rho:
                    cand = torch._foreach_mul(cand, rho / cnorm)
                loss, cand_grad = obj.loss_and_scaled_grad(cand)
                if loss > best_loss:
                    best_u, best_loss, grad = cand, loss, cand_grad
                else:
                    step /= 2
                trace.append(best_loss - base)
            e = torch._foreach_mul(best_u, scale)
            value, stderr = best_loss - base, float("nan")
            pert_norm, scaled_norm = _norm(e), _norm(best_u)
        else:
            base = obj.loss(None)
            incs, norms = [], []
            for _ in _progress(range(int(n_samples)), enabled=progress, desc="average sharpness"):
                u = sphere()
                incs.append(obj.loss(u) - base)
                norms.append(_norm(torch._foreach_mul(u, scale)))
            trace = incs
            value = float(np.mean(incs))
            stderr = float(np.std(incs, ddof=1) / math.sqrt(len(incs))) if len(incs) > 1 else float("nan")
            pert_norm, scaled_norm = float(np.mean(norms)), rho
    if not math.isfinite(value):
        raise FloatingPointError(f"{kind}-case sharpness is not finite ({value}): the loss overflows within "
                                 f"rho={rho}; use a smaller rho or check the model")
    return SharpnessResult(kind, float(value), stderr, float(base), pert_norm, scaled_norm,
                           np.asarray(trace, dtype=np.float64), settings)
