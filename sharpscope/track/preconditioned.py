r"""``preconditioned``: the sharpness the optimizer actually sees, next to its stability threshold.

Adam-type optimizers (Adam, AdamW, NAdam, RAdam) step ``w <- w - lr * m_hat / P`` with the diagonal
preconditioner :math:`P = \operatorname{diag}(\sqrt{\hat v}) + \epsilon`, :math:`\hat v = v / (1 -
\beta_2^t)`. On a quadratic the iteration is stable while the top eigenvalue of :math:`P^{-1} H` stays
below :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\mathrm{lr})` (38/lr at :math:`\beta_1 = 0.9`), and
during training it rises to that value and hovers there: the edge of stability of adaptive methods
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"). :math:`P^{-1} H` is not
symmetric but is similar to :math:`D H D` with :math:`D = P^{-1/2}`, which has the same eigenvalues;
Lanczos runs on :math:`D H D`, warm-started between events like ``lambda_max``.

For SGD with momentum :math:`\beta` (dampening :math:`\tau`) there is no preconditioner
(:math:`P = I`) and the threshold of heavy-ball momentum is :math:`(2 + 2\beta) / ((1 - \tau)\,
\mathrm{lr})` (:math:`2 (1 + \beta) / ((1 + 2\beta)\,\mathrm{lr})` with Nesterov), from the 2x2 linear
recurrence on one eigendirection. The value then *is* ``lambda_max`` (reused when both are tracked).
Sharpness-aware wrappers (SAM, ZSharp, ...) are read through their ``base_optimizer``. Weight decay is
not part of :math:`H` here (it adds ``weight_decay`` to every eigenvalue of the loss Hessian the
optimizer sees). The threshold is left out when the param groups use different learning rates or betas.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserInputError
from .lambda_max import WarmStartLanczos, eigen_values
from .measure import Event, Measure
from .rows import TrackRow
from .stability import adam_preconditioner, base_optimizer, is_adam_type, stability_threshold


class Preconditioned(Measure):
    """Top eigenvalue of ``P^-1 H`` (Adam-type) or of ``H`` (SGD), with the stability threshold.

    Row values: ``value``, ``threshold`` (when defined), ``ratio = value / threshold``, and the Lanczos
    ``residual``, ``error_bound``, ``n_hvp``, ``converged``.
    """

    name = "preconditioned"

    def __init__(self, every: int | None = None, tol: float = 1e-2, max_hvp: int = 50,
                 cold_every: int | None = None, seed: int = 1) -> None:
        super().__init__(every)
        self.lanczos = WarmStartLanczos(tol, max_hvp, seed, cold_every)

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            raise UserInputError("the 'preconditioned' measure reads the optimizer: call tracker.step(step, "
                                 "optimizer=opt)")
        if not (is_adam_type(optimizer) or isinstance(base_optimizer(optimizer), torch.optim.SGD)):
            raise UserInputError("the 'preconditioned' measure needs an Adam-type or SGD (base) optimizer; got "
                                 f"{type(base_optimizer(optimizer)).__name__}")

    def measure(self, event: Event) -> TrackRow | None:
        self.check(event.optimizer)
        assert event.optimizer is not None
        values = self._adam(event) if is_adam_type(event.optimizer) else self._sgd(event)
        if values is None:
            return None
        threshold = stability_threshold(event.optimizer)
        if threshold is not None:
            values.update(threshold=threshold, ratio=values["value"] / threshold)
        return TrackRow(event.step, self.name, values)

    def _sgd(self, event: Event) -> dict[str, float]:
        if "lambda_max" in event.results:
            return dict(event.results["lambda_max"])
        op = event.operator()
        out, cold = self.lanczos.run(op.matvec, op.parameters_vector())
        return eigen_values(out, cold)

    def _adam(self, event: Event) -> dict[str, float] | None:
        op = event.operator()
        params = [p for _, p in event.model.named_parameters() if p.requires_grad]
        P = adam_preconditioner(event.optimizer, params)  # type: ignore[arg-type]
        if P is None:
            return None
        d = op.flatten([t.rsqrt() for t in P])

        def matvec(u: torch.Tensor) -> torch.Tensor:
            return d * op.matvec(d * u)

        out, cold = self.lanczos.run(matvec, d)
        return eigen_values(out, cold)

    def state_dict(self) -> dict[str, Any]:
        return {"lanczos": self.lanczos.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lanczos.load_state_dict(state.get("lanczos", {}))
