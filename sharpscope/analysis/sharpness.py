"""Sharpness numbers: the loss increase in a ball around the weights, worst case or on average.

For weights ``w``, loss ``L`` on the whole ``data`` and radius ``rho``
(Keskar et al. 2017; Foret et al. 2021; Andriushchenko et al., ICML 2023, "A modern look at the
relationship between sharpness and generalization"):

* worst case:    ``S_max(w) = max_{||T^-1 e|| <= rho} L(w + e) - L(w)``
* average case:  ``S_avg(w) = E_{e = T u, u uniform on the sphere ||u|| = rho} L(w + e) - L(w)``
  (a Gaussian draw rescaled to norm ``rho``).

Average case with antithetic pairs (the default): each draw ``u`` is evaluated at ``+u`` and ``-u`` and
the sample is ``(L(w + Tu) + L(w - Tu)) / 2 - L(w)``. Since ``u`` and ``-u`` are equally likely its mean
is still ``S_avg``, but the first-order term ``g^T T u`` (the noisiest part when ``g != 0``) cancels
exactly: ``L(w + e) - L(w) = g^T e + e^T H e / 2 + O(rho^3)`` and the pair keeps
``e^T H e / 2 + O(rho^4)``. On a quadratic the pair sample is exactly ``e^T H e / 2`` whose mean is
``rho^2 sum_i lambda_i / (2 P)`` (``P`` parameters, ``T = I``). Pairs cost two evaluations per draw.

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
from .._validate import choice, integer, number, positive_int, positive_number
from ..errors import UserInputError
from ..threads import analysis_threads
from .batching import (
    Batch,
    batch_size,
    model_device,
    prepared_batches,
    preserved_model_state,
    to_device,
)
from .evaluation import assign_parameters, full_data_gradient, full_data_loss, global_norm
from .objective import as_objective
from .parallel import main_progress, rank_and_world, use_ranks
from .results import Result, damaged_result_file, model_fingerprint, provenance, read_dataset, write_dataset

KIND = "sharpness"


@dataclass
class SharpnessResult(Result):
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
        settings: rho, adaptive, eta, ignore, steps/samples, seed, data size, model fingerprint, provenance.
    """

    kind: str
    value: float
    stderr: float
    base_loss: float
    perturbation_norm: float
    scaled_norm: float
    trace: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    KIND = KIND

    def to_dataframe(self) -> pd.DataFrame:
        """One row: the number, its error, the norms and the main settings."""
        row = {"kind": self.kind, "rho": self.settings.get("rho"), "adaptive": self.settings.get("adaptive"),
               "value": self.value, "stderr": self.stderr, "base_loss": self.base_loss,
               "perturbation_norm": self.perturbation_norm, "scaled_norm": self.scaled_norm}
        return pd.DataFrame([row])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a netCDF result file: the trace, the number and the settings."""
        ds = xr.Dataset({"trace": (("index",), np.asarray(self.trace, dtype=np.float64))})
        meta = {"kind": self.kind, "value": self.value, "stderr": self.stderr, "base_loss": self.base_loss,
                "perturbation_norm": self.perturbation_norm, "scaled_norm": self.scaled_norm,
                "settings": self.settings}
        return write_dataset(ds, path, KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SharpnessResult:
        """Read a file written by :meth:`save` (also by sharpscope 0.1)."""
        ds, meta = read_dataset(path, KIND)
        nan = float("nan")
        with damaged_result_file(path, KIND):
            return cls(meta["kind"], float(meta["value"]), nan if meta["stderr"] is None else float(meta["stderr"]),
                       float(meta["base_loss"]), float(meta["perturbation_norm"]), float(meta["scaled_norm"]),
                       ds["trace"].values, dict(meta["settings"]))


class _Objective:
    """Full-data loss (and gradient) at ``w0 + T u`` for the chosen parameters.

    ``u`` is a list of tensors shaped like the parameters (``None`` for ``u = 0``), ``T`` the elementwise
    ``scale``. The model's parameters are written to (inside :func:`preserved_model_state`).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Sequence[Batch],
                 params: list[nn.Parameter], scale: list[torch.Tensor], distributed: bool = False) -> None:
        self.model, self.loss_fn, self.params, self.scale = model, loss_fn, params, scale
        self.distributed = distributed
        device = model_device(model)
        self.batches = [to_device(b, device) for b in batches]
        self.base = [p.detach().clone() for p in params]

    def _set(self, u: list[torch.Tensor] | None) -> None:
        """``w <- w0 + T u``."""
        assign_parameters(self.params, self.base if u is None
                          else torch._foreach_add(self.base, torch._foreach_mul(u, self.scale)))

    def loss(self, u: list[torch.Tensor] | None) -> float:
        """``L(w0 + T u)``."""
        self._set(u)
        return float(full_data_loss(self.model, self.loss_fn, self.batches, distributed=self.distributed))

    def loss_and_scaled_grad(self, u: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor]]:
        """``L(w0 + T u)`` and ``T * grad L`` (the gradient with respect to ``u``)."""
        self._set(u)
        loss, grads = full_data_gradient(self.model, self.loss_fn, self.batches, self.params,
                                         distributed=self.distributed)
        return loss, torch._foreach_mul(grads, self.scale)


@dataclass
class _Outcome:
    """What one search found: the increase, its error, ``||e||``, ``||T^-1 e||``, the per-step trace."""

    base: float
    value: float
    stderr: float
    perturbation_norm: float
    scaled_norm: float
    trace: list[float]


class _Sphere:
    """Random points ``u`` with ``||u|| = rho`` (a Gaussian draw rescaled), reproducible from a seed."""

    def __init__(self, params: list[nn.Parameter], rho: float, seed: int) -> None:
        self.params, self.rho = params, rho
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self) -> list[torch.Tensor]:
        z = [torch.randn(p.shape, generator=self.gen, dtype=torch.float64).to(p.device, p.dtype)
             for p in self.params]
        return torch._foreach_mul(z, self.rho / global_norm(z))


def _usable(norm: float) -> bool:
    return norm > 0 and math.isfinite(norm)


def _worst_case(obj: _Objective, sphere: _Sphere, rho: float, steps: int, progress: bool) -> _Outcome:
    """Projected, normalised gradient ascent in ``u`` from the SAM step (module docstring)."""
    base, g = obj.loss_and_scaled_grad(None)
    gnorm = global_norm(g)
    u = torch._foreach_mul(g, rho / gnorm) if _usable(gnorm) else sphere.draw()
    best_loss, grad = obj.loss_and_scaled_grad(u)
    best_u, step = u, rho
    trace = [best_loss - base]
    for _ in _progress(range(steps), enabled=progress, desc="worst-case sharpness"):
        gnorm = global_norm(grad)
        if not _usable(gnorm):
            break
        cand = torch._foreach_add(best_u, torch._foreach_mul(grad, step / gnorm))
        cnorm = global_norm(cand)
        if cnorm > rho:  # project back onto the ball
            cand = torch._foreach_mul(cand, rho / cnorm)
        loss, cand_grad = obj.loss_and_scaled_grad(cand)
        if loss > best_loss:
            best_u, best_loss, grad = cand, loss, cand_grad
        else:
            step /= 2
        trace.append(best_loss - base)
    return _Outcome(base, best_loss - base, float("nan"), global_norm(torch._foreach_mul(best_u, obj.scale)),
                    global_norm(best_u), trace)


def _average_case(obj: _Objective, sphere: _Sphere, rho: float, n_samples: int, progress: bool,
                  antithetic: bool = True) -> _Outcome:
    """Mean increase over ``n_samples`` draws of the sphere (each at ``+-u`` when ``antithetic``), with its
    standard error (over the i.i.d. draws, or pairs)."""
    base = obj.loss(None)
    incs, norms = [], []
    for _ in _progress(range(n_samples), enabled=progress, desc="average sharpness"):
        u = sphere.draw()
        if antithetic:
            incs.append((obj.loss(u) + obj.loss(torch._foreach_neg(u))) / 2 - base)
        else:
            incs.append(obj.loss(u) - base)
        norms.append(global_norm(torch._foreach_mul(u, obj.scale)))
    stderr = float(np.std(incs, ddof=1) / math.sqrt(len(incs))) if len(incs) > 1 else float("nan")
    return _Outcome(base, float(np.mean(incs)), stderr, float(np.mean(norms)), rho, incs)


def _perturbed(model: nn.Module, ignore: str) -> list[tuple[str, nn.Parameter]]:
    """The trainable tensors to perturb (all, or those with ``ndim > 1`` for ``ignore="biasbn"``)."""
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and not (ignore == "biasbn" and p.dim() <= 1)]
    if not named:
        raise UserInputError("no parameter to perturb: the model has no trainable parameter "
                             "(left after ignore='biasbn')")
    return named


def _checked_arguments(rho: Any, kind: Any, ignore: Any, steps: Any, n_samples: Any, eta: Any,
                       seed: Any) -> tuple[float, int, int, float, int]:
    """``rho, steps, n_samples, eta, seed`` validated (each bad value is one ``UserInputError``)."""
    rho = positive_number(rho, "rho")
    choice(kind, "kind", ("worst", "average"))
    choice(ignore, "ignore", ("none", "biasbn"))
    return (rho, positive_int(steps, "steps"), positive_int(n_samples, "n_samples"),
            number(eta, "eta", minimum=0.0), integer(seed, "seed", minimum=None))


@analysis_threads
def sharpness(model: nn.Module, loss_fn: Callable, data: Any, rho: float = 0.05, kind: str = "worst",
              adaptive: bool = False, *, steps: int = 20, n_samples: int = 20, eta: float = 0.0,
              ignore: str = "none", seed: int = 0, progress: bool = False, antithetic: bool = True,
              distributed: bool | None = None) -> SharpnessResult:
    """Worst-case or average-case loss increase within radius ``rho`` (see the module docstring).

    Args:
        model: the network at ``w``; evaluated in eval mode and left exactly as found.
        loss_fn: ``loss_fn(outputs, targets)`` (mean-reduced), ``loss_fn(model, batch)``, a name
            (``"lm"``, ``"hf"``) or an :class:`~sharpscope.analysis.objective.Objective`.
        data: one batch (``(inputs, targets)`` or a dict of tensors) or an iterable of them (the loss is
            the mean over all of its targets).
        rho: radius of the ball (in ``u = T^-1 e`` when adaptive), > 0.
        kind: ``"worst"`` (projected gradient ascent) or ``"average"`` (random directions).
        adaptive: scale the ball elementwise by ``T = |w| + eta`` (Kwon et al. 2021).
        steps: ascent steps for ``kind="worst"`` (each one forward/backward pass over ``data``).
        n_samples: random draws ``u`` for ``kind="average"`` (with ``antithetic``: pairs ``+-u``, two
            evaluations each; the trace then holds the pair samples).
        eta: offset of ``T`` in the adaptive variant (>= 0; 0 as Andriushchenko et al. 2023).
        ignore: ``"none"`` perturbs every trainable parameter; ``"biasbn"`` leaves tensors with
            ``ndim <= 1`` (biases, normalisation layers) fixed.
        seed: seed of the random draws (the average case, or the start when the gradient is zero).
        progress: show a progress bar (on rank 0).
        antithetic: average case with antithetic pairs (module docstring); False: one point per draw.
        distributed: data-parallel over the ranks of ``torch.distributed`` (``None``: when a process group
            with several ranks is initialised): every loss and gradient is summed over the ranks' shares
            of the batches, so every rank follows the same ascent and holds the same result.

    Raises ``UserInputError`` for bad arguments, non-finite weights or a model that cannot run on the
    data (checked before any long work); ``FloatingPointError`` if the loss overflows within ``rho``.
    """
    rho, steps, n_samples, eta, seed = _checked_arguments(rho, kind, ignore, steps, n_samples, eta, seed)
    loss_fn = as_objective(loss_fn, model)
    batches = prepared_batches(model, loss_fn, data)
    named = _perturbed(model, ignore)
    settings = {"rho": rho, "adaptive": bool(adaptive), "eta": eta if adaptive else None,
                "ignore": ignore, "seed": seed, "steps": steps if kind == "worst" else None,
                "n_samples": n_samples if kind == "average" else None,
                "antithetic": bool(antithetic) if kind == "average" else None,
                "n_examples": int(sum(batch_size(b) for b in batches)), "model_fingerprint": model_fingerprint(model),
                "parameters": [n for n, _ in named], "provenance": provenance()}
    active = use_ranks(distributed)
    settings["world_size"] = rank_and_world(active)[1]
    progress = main_progress(progress)
    with preserved_model_state(model, train=False):
        params = [p for _, p in named]
        scale = [(p.detach().abs() + eta) if adaptive else torch.ones_like(p) for p in params]
        obj = _Objective(model, loss_fn, batches, params, scale, distributed=active)
        sphere = _Sphere(params, rho, seed)
        found = (_worst_case(obj, sphere, rho, steps, progress) if kind == "worst"
                 else _average_case(obj, sphere, rho, n_samples, progress, bool(antithetic)))
    if not math.isfinite(found.value):
        raise FloatingPointError(f"{kind}-case sharpness is not finite ({found.value}): the loss overflows within "
                                 f"rho={rho}; use a smaller rho or check the model")
    return SharpnessResult(kind, float(found.value), found.stderr, float(found.base), found.perturbation_norm,
                           found.scaled_norm, np.asarray(found.trace, dtype=np.float64), settings)
