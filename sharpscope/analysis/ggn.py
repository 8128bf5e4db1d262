"""The generalised Gauss-Newton matrix (GGN) of the full-data loss as a linear operator.

Write the loss of batch ``b`` as ``L_b(w) = l_b(f_b(w))``: the network outputs ``f_b(w)`` (logits) and
a loss ``l_b`` of those outputs (:meth:`~sharpscope.analysis.objective.Objective.outputs` and
:meth:`~sharpscope.analysis.objective.Objective.loss`). With ``J_b = df_b/dw`` and
``H_b = d^2 l_b / df^2`` (the Hessian of the loss w.r.t. the outputs) the operator applies

    G v = sum_b (c_b / N) J_b^T H_b J_b v,            c_b = count(batch b),  N = sum_b c_b,

the Hessian with the term ``sum_k (dl/df_k) d^2 f_k / dw^2`` dropped (Schraudolph 2002; Martens 2020,
"New insights and perspectives on the natural gradient method"). For a loss convex in the outputs
(cross-entropy, MSE, label smoothing, token cross-entropy) every ``H_b`` is positive semi-definite,
hence so is ``G``: its spectrum has no negative outliers, Lanczos and SLQ need no care with signs, and
for cross-entropy ``G`` equals the Fisher information of the model's predictive distribution.
For softmax cross-entropy of one example with probabilities ``p``, ``H = (diag(p) - p p^T) / c``;
the operator does not hard-code this: ``H_b u`` is derived for any objective by differentiating the
gradient of ``l_b`` w.r.t. the outputs once more, so MSE, label smoothing and token cross-entropy with
``ignore_index`` need nothing special. That second derivative is taken in reverse mode,
``vjp(grad(l_b), f)(u) = H_b^T u = H_b u`` (``H_b`` is symmetric), not forward mode: ``jvp`` of the
gradient of ``F.mse_loss`` fails in torch 2.13 ("ZeroTensors are immutable"). It touches only the outputs,
so its cost is negligible either way.

One product per batch costs one ``jvp`` of the network (forward mode, ``J_b v`` with the outputs), the
loss-Hessian product on the outputs (tiny), and one ``vjp`` (a forward and a backward pass,
``J_b^T u``) -- no double backward through the network, so it is cheaper and leaner than a
Hessian-vector product (measured on one CPU thread, two batches: 2.2 gradients per product on ResNet-20
and 2.0 on a 2-block ViT, against 3-4.5 for a Hessian-vector product), and it needs the forward-mode
derivative of every operation in the model. Attention runs on the math kernel during every product
(:mod:`sharpscope.analysis.attention`; it materialises the attention matrix).

:class:`GGNOperator` has the interface of :class:`~sharpscope.analysis.curvature.HessianOperator`
(it is a subclass: parameter snapshot, flat vectors, context manager, data-parallel all-reduce and the
scipy view are the Hessian operator's), so Lanczos, Hutch++, SLQ and per-layer curvature run on it
unchanged: ``hessian_eigenvalues(..., curvature="ggn")``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp

from ..errors import UserInputError
from .attention import math_attention
from .batching import Batch, LossFn, checked_loss, eval_mode, to_device
from .curvature import HessianOperator, _add_weighted, _Weighted
from .objective import as_objective, functional_model

#: ``method`` of a :class:`GGNOperator` (recorded as ``hvp`` in the settings of results).
GGN_METHOD = "jvp-vjp"


def check_ggn_objective(loss_fn: Any, model: Any = None) -> None:
    """Refuse (one line) an objective whose loss is not a function of the model's outputs."""
    objective = as_objective(loss_fn, model)
    if not objective.outputs_are_logits:
        raise UserInputError(f"the Gauss-Newton matrix needs the loss as a function of the model's outputs, but the "
                             f"{objective.name!r} objective computes it inside the model; pass loss_fn(outputs, "
                             "targets) or loss_fn='lm', or use curvature='hessian'")


class GGNOperator(HessianOperator):
    """Generalised Gauss-Newton matrix ``G = sum_b (c_b/N) J_b^T H_b J_b`` of the full-data loss (PSD).

    Same interface as :class:`~sharpscope.analysis.curvature.HessianOperator` (``dim``, ``n_hvp``,
    ``matvec``/``@``, ``unflatten``/``flatten``, ``parameters_vector``, ``param_names``/``shapes``,
    ``device``/``dtype``, ``as_linear_operator``, context manager, ``distributed``, ``progress``); see
    the module docstring for the maths. ``n_hvp`` counts GGN-vector products.

    Args:
        model, data, params, dtype, progress, distributed: as for ``HessianOperator``.
        loss_fn: an objective whose loss is a function of the model's outputs
            (``loss_fn(outputs, targets)``, ``"lm"``, a ``ClassificationLoss`` / ``TokenCrossEntropy``);
            a loss computed inside the model (``"hf"``, ``loss_fn(model, batch)``) is refused with a
            ``UserInputError``.

    ``method`` is ``"jvp-vjp"``; ``fallback_reason`` is always None (there is no other method: a model
    without forward-mode derivatives raises at the first product).

    Example::

        with GGNOperator(model, nn.CrossEntropyLoss(), loader) as op:
            gv = op @ torch.randn(op.dim, device=op.device, dtype=op.dtype)
    """

    #: Which curvature matrix the operator applies (``"hessian"`` for the parent class).
    curvature = "ggn"

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, params: Iterable[torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, progress: bool = False,
                 distributed: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_ggn_objective(loss_fn, model)  # before any work
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, hvp="auto", progress=progress,
                         distributed=distributed)

    def _choose_method(self, hvp: str) -> str:
        """One method: no trial product, no fallback (see the class docstring)."""
        return GGN_METHOD

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for a flat vector ``v`` of length ``dim``; returns a flat tensor (device, dtype)."""
        vs = tuple(self.unflatten(v))
        losses: list[torch.Tensor] = []
        with eval_mode(self.model), math_attention(self.model):
            out = self._ggn_products(vs, self._weighted_batches(), losses)
        flat = self._reduced(out, losses, "the Gauss-Newton-vector product")
        self.n_hvp += 1
        return flat

    __matmul__ = matvec

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``G V`` for a block ``V`` of shape ``(dim, k)``: ``k`` products (no shared graph to reuse)."""
        V = self._check_block(V)
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _ggn_products(self, vs: tuple[torch.Tensor, ...], batches: Iterable[_Weighted],
                      losses: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """``sum_b w_b J_b^T H_b J_b v`` over this rank's batches (None for no batch)."""
        total: list[torch.Tensor] | None = None
        for batch, weight in batches:
            if weight == 0:  # no targets (e.g. every label is ignore_index): no contribution
                continue
            gv, loss = self._ggn_batch(vs, to_device(batch, self.device, self.dtype))
            losses.append(loss)
            total = _add_weighted(total, gv, weight)
        return total

    def _ggn_batch(self, vs: tuple[torch.Tensor, ...], batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``J^T H J v`` of one batch (``H`` the Hessian of its mean loss w.r.t. the outputs) and its loss.

        ``J v`` by forward mode with the outputs, ``H (J v)`` by reverse-over-reverse on the loss of the
        outputs (module docstring), ``J^T (H J v)`` by reverse mode.
        """
        def forward(ps: tuple[torch.Tensor, ...]) -> Any:
            return self.objective.outputs(functional_model(self.model, self._tensors(ps)), batch)

        def loss_of(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            loss = checked_loss(self.objective.loss(outputs, batch))
            return loss, loss.detach()

        outputs, jv = jvp(forward, (self._params,), (vs,))
        _, loss_hessian, loss = vjp(grad(loss_of, has_aux=True), outputs, has_aux=True)
        (hjv,) = loss_hessian(jv)
        _, pullback = vjp(forward, self._params)
        (gv,) = pullback(hjv)
        return gv, loss

    def __repr__(self) -> str:
        return (f"GGNOperator(dim={self.dim}, tensors={len(self.shapes)}, batches={len(self.batches)}, "
                f"dtype={self.dtype}, device={self.device}, n_hvp={self.n_hvp})")
