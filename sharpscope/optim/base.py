r"""The two-pass protocol shared by every sharpness-aware optimizer (SAM, ASAM, ZSharp, F-SAM).

One step on a batch (Foret et al. 2021; the davda54/sam protocol):

1. forward/backward at :math:`w` gives :math:`g`; ``first_step`` computes the ascent
   :math:`e(w)` (what differs between the methods), saves :math:`w`, sets :math:`w \leftarrow w + e`;
2. forward/backward on the same batch at :math:`w + e` gives :math:`g'`; ``second_step`` copies the
   saved tensors back (exactly those that were perturbed) and lets the base optimizer step with
   :math:`g'`. Weight decay, momentum, Adam moments all live in the base optimizer.

The wrapper and the base optimizer share one ``param_groups`` list, so LR schedulers attached to the
wrapper and per-group hyper-parameters (``rho`` included) reach both.

Mixed precision with ``torch.amp.GradScaler`` (fp16; bf16 autocast needs no scaler)::

    scaler.scale(loss_fn(model(x), y)).backward()
    scaler.unscale_(opt)                      # pass-1 gradient at its true scale
    opt.first_step(zero_grad=True)            # no host sync, even for inf/NaN gradients
    scaler.scale(loss_fn(model(x), y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()

``second_step(grad_scaler=...)`` restores :math:`w`, then runs ``grad_scaler.step`` on the base
optimizer, which unscales :math:`g'` and skips the update when it is not finite. A non-finite
pass-1 gradient is carried into that check (one entry of :math:`g'` is set to NaN on the device), so
the whole step is skipped and the weights stay exactly as they were if *either* pass overflowed;
``scaler.update()`` then lowers the scale. ``restore()`` undoes a perturbation without any step.

``step(closure)`` serves both closure conventions; the closure zeroes (or not) the gradients, runs
the forward and backward passes and returns the loss:

- **davda54/sam style**: the caller has already run the pass-1 backward, then calls
  ``opt.step(closure)``. Some parameter then holds a gradient that is not all zero; that gradient is
  the ascent's, and the closure runs *once*, for pass 2 (two forward passes per step in all, so
  BatchNorm running statistics are updated twice, as with ``first_step``/``second_step``)::

      loss_fn(model(x), y).backward()
      opt.step(closure)          # closure: loss = loss_fn(model(x), y); loss.backward(); return loss
      opt.zero_grad()

- **torch style**: no gradient is present (``None``, or all zeros as ``zero_grad(set_to_none=False)``
  leaves them), so ``step`` runs the closure for pass 1 and again for pass 2, and returns the
  pass-1 loss::

      loss = opt.step(closure)   # closure: opt.zero_grad(); loss = ...; loss.backward(); return loss

Both give exactly the weights and BatchNorm buffers of the two explicit calls. ``step`` clears the
gradients (sets them to ``None``) when it returns, so that the next call cannot take the pass-2
gradient left behind for a fresh pass-1 one; telling the two cases apart reads one boolean from the
device (``first_step``/``second_step`` read none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._validate import number
from ..errors import UserInputError

Closure = Callable[[], torch.Tensor]


def check_base_optimizer(base_optimizer: Any) -> None:
    """Raise unless ``base_optimizer`` is a ``torch.optim.Optimizer`` subclass (the class itself)."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise UserInputError(
            "base_optimizer must be an optimizer class such as torch.optim.SGD, not an instance "
            f"({type(base_optimizer).__name__}); its keyword arguments go to the wrapper"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise UserInputError(
            "base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, "
            f"got {base_optimizer!r}"
        )


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Base class: the two-pass step around a base optimizer; subclasses define the ascent.

    Subclasses implement :meth:`_perturb`, which adds :math:`e(w)` to the parameters with a
    gradient, and list in ``_hyper`` the per-group hyper-parameters they validate.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` or a list of param-group dicts
            (names are kept in each group's ``"param_names"``, as ``torch.optim`` does).
        base_optimizer: the optimizer class that takes the descent step, e.g. ``torch.optim.SGD``.
        defaults: the wrapper's own per-group hyper-parameters (``rho`` and friends).
        **base_kwargs: keyword arguments of the base optimizer (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        **base_kwargs: Any,
    ) -> None:
        check_base_optimizer(base_optimizer)
        self._own_defaults = dict(defaults)
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)
        # (param, saved value) of the tensors perturbed by the last first_step; None between steps.
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pass1_finite: torch.Tensor | None = None

    # -- parameter groups ------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        number(group["rho"], "rho", minimum=0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to both the wrapper and the base optimizer (they share the list)."""
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during __init__
            super().add_param_group(param_group)
            return
        for key, value in self._own_defaults.items():
            param_group.setdefault(key, value)
        base.add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _named_params_with_grad(self) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
        """``(group, name, param)`` for every trainable parameter that has a gradient now."""
        out = []
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = names[i] if names is not None else f"param{index}"
                index += 1
                if p.grad is None or not p.requires_grad:
                    continue
                out.append((group, name, p))
        return out

    @property
    def has_names(self) -> bool:
        """Whether the parameters were given with names (``named_parameters()``)."""
        return bool(self.param_groups) and "param_names" in self.param_groups[0]

    # -- the two passes --------------------------------------------------------------------
    def _perturb(
        self, items: list[tuple[dict[str, Any], str, torch.Tensor]], grad_norm: torch.Tensor
    ) -> None:
        """Add the ascent ``e(w)`` to each listed parameter in place (subclasses).

        ``grad_norm`` is the global norm of the raw gradients of ``items`` (0-d device tensor).
        """
        raise NotImplementedError

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to :math:`w + e(w)` using the current gradients; save :math:`w` to restore it."""
        if self._saved is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): call second_step() (or restore()) "
                "after the backward pass at the perturbed point"
            )
        items = self._named_params_with_grad()
        if not items:
            raise RuntimeError("first_step(): no parameter has a gradient; run a backward pass first")
        grad_norm = global_grad_norm([p.grad for _, _, p in items])
        self._pass1_finite = torch.isfinite(grad_norm)
        self._saved = [(p, p.detach().clone()) for _, _, p in items]
        self._perturb(items, grad_norm)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy back the tensors perturbed by the last ``first_step`` (no descent step)."""
        if self._saved is None:
            raise RuntimeError("restore()/second_step() called before first_step(): nothing to restore")
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore :math:`w` and take the base optimizer's step with the gradient at :math:`w + e`.

        With ``grad_scaler`` (a ``torch.amp.GradScaler``) the base step goes through
        ``grad_scaler.step`` and is skipped if the pass-1 or the pass-2 gradient is not finite
        (see the module docstring for the recipe).
        """
        self.restore()
        if grad_scaler is None:
            self.base_optimizer.step()
        else:
            self._poison_if_pass1_failed()
            grad_scaler.step(self.base_optimizer)
        self._pass1_finite = None
        # LR schedulers attached to this wrapper check this flag to see that a step happened.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def _poison_if_pass1_failed(self) -> None:
        # Adding 0.0 leaves a finite gradient unchanged; NaN makes the scaler's inf check fail.
        if self._pass1_finite is None:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(torch.where(self._pass1_finite, 0.0, float("nan")).to(p.grad.dtype))
                    return

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One sharpness-aware step; ``closure`` runs forward and backward and returns the loss.

        If the caller already ran the pass-1 backward (some parameter has a gradient that is not all
        zero: the davda54/sam convention), that gradient gives the ascent and the closure runs once,
        at :math:`w + e`; ``None`` is returned (the caller has the pass-1 loss). Otherwise (gradients
        ``None`` or all zero: the torch convention) the closure runs at :math:`w` and at
        :math:`w + e` and the loss at :math:`w` is returned. Either way the gradients are cleared
        (``None``) on return. See the module docstring.
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure (forward, backward, return loss), or call "
                "first_step() and second_step() around your own backward passes"
            )
        loss = None
        if not self._has_pass1_gradient():
            with torch.enable_grad():
                loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step(zero_grad=True)
        return loss

    def _has_pass1_gradient(self) -> bool:
        """Whether some trainable parameter holds a gradient that is not all zero (one device read)."""
        grads = [p.grad for _, _, p in self._named_params_with_grad()]
        if not grads:
            return False
        device = grads[0].device
        return bool(torch.stack([g.any().to(device) for g in grads]).any())

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state (e.g. F-SAM's momentum) plus the base optimizer's, under ``"base"``."""
        state = super().state_dict()
        state["base"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the base optimizer gets its momentum/moments back too."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base", None)
        if base_state is None:
            raise UserInputError(
                "state_dict has no 'base' entry: it was not saved by a sharpscope sharpness-aware "
                "optimizer's state_dict()"
            )
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base_state)
        # Both loads built fresh group dicts; share the base optimizer's again.
        self.param_groups = self.base_optimizer.param_groups
        self._saved = None


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    r""":math:`\|g\| = \sqrt{\sum_t \|g_t\|^2}` over the listed tensors, as a 0-d device tensor."""
    if not grads:
        raise ValueError("no gradients: run a backward pass before first_step()")
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g).to(device) for g in grads]
    dtype = torch.float32
    for n in norms:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))
