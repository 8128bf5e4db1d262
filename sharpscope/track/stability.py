"""What the optimizer says about stability: its preconditioner and the edge-of-stability threshold.

See :mod:`sharpscope.track.preconditioned` for the maths. Sharpness-aware wrappers (SAM, ZSharp, ...)
are read through their ``base_optimizer``.
"""

from __future__ import annotations

from typing import Any

import torch


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that takes the descent step (the wrapped one of SAM/ZSharp/...)."""
    return getattr(optimizer, "base_optimizer", optimizer)


def is_adam_type(optimizer: torch.optim.Optimizer) -> bool:
    """Adam, AdamW, NAdam, RAdam: param groups with ``betas`` and second moments ``exp_avg_sq``."""
    base = base_optimizer(optimizer)
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam))


def _shared(groups: list[dict[str, Any]], key: str) -> Any:
    values = {repr(g.get(key)) for g in groups}
    return groups[0].get(key) if len(values) == 1 else None


def stability_threshold(optimizer: torch.optim.Optimizer) -> float | None:
    """The edge-of-stability value of the tracked sharpness for this optimizer (None if not defined).

    Adam-type: ``(2 + 2 beta1) / ((1 - beta1) lr)`` for ``lambda_max(P^-1 H)``; SGD:
    ``(2 + 2 beta) / ((1 - dampening) lr)`` (Nesterov: ``2 (1 + beta) / ((1 + 2 beta) lr)``) for
    ``lambda_max(H)``. None for other optimizers and for param groups that disagree on lr or betas.
    """
    base = base_optimizer(optimizer)
    groups = base.param_groups
    lr = _shared(groups, "lr")
    if not lr:
        return None
    lr = float(lr)
    if is_adam_type(optimizer):
        betas = _shared(groups, "betas")
        return None if betas is None else (2 + 2 * float(betas[0])) / ((1 - float(betas[0])) * lr)
    if isinstance(base, torch.optim.SGD):
        beta, damp, nesterov = (_shared(groups, k) for k in ("momentum", "dampening", "nesterov"))
        if beta is None or damp is None or nesterov is None:
            return None
        if nesterov and beta > 0:
            return 2 * (1 + beta) / ((1 + 2 * beta) * lr)
        return (2 + 2 * beta) / ((1 - damp) * lr) if damp < 1 else None
    return None


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    r""":math:`P = \sqrt{\hat v} + \epsilon` per parameter (None before the optimizer's first step).

    ``amsgrad`` uses the running maximum of :math:`v`, as Adam does.
    """
    base = base_optimizer(optimizer)
    group_of = {id(p): g for g in base.param_groups for p in g["params"]}
    out = []
    for p in params:
        state, group = base.state.get(p, {}), group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state:
            return None
        v = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
        t = float(state["step"])
        v_hat = v.detach().double() / (1 - float(group["betas"][1]) ** t)
        out.append(v_hat.sqrt() + float(group["eps"]))
    return out
