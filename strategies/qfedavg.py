"""q-FedAvg (Li, Sanjabi, Beirami and Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR, Algorithm 2): reweights clients by their loss so the model is fairer to the
clients it serves worst.

With L the Lipschitz estimate (1 / client learning rate), F_k client k's loss at the global
model w^t and Δw_k = L (w^t − w_k) its scaled model change (fedbus deltas are w_k − w^t, so
Δw_k = −L·delta_k):

    Δ_k = F_k^q Δw_k
    h_k = q F_k^(q−1) ‖Δw_k‖² + L F_k^q
    w^{t+1} = w^t − Σ_k Δ_k / Σ_k h_k

q = 0 is plain unweighted FedAvg (h_k = L); larger q leans towards high-loss clients. Both sums
stream, so memory is one model-sized float64 sum. F_k comes from the update's metrics
(``loss_key``, default ``train_loss``: the task's average loss over local training, which
approximates the loss at w^t the paper asks for; a task can report the exact value under any
key). An update without a finite, non-negative loss is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from strategies._server_state import apply_step
from strategies.base import (
    ClientUpdate,
    Strategy,
    StrategyError,
    Weights,
    check_compatible,
    positive_number,
)

__all__ = ["QFedAvg"]

# The paper's code (and Flower's) adds this to F_k so 0^(q-1) never divides by zero.
_EPS = 1e-10


class QFedAvg(Strategy):
    """Server side of q-FedAvg.

    Args:
        q: fairness parameter q >= 0 (0: FedAvg; the paper uses 0.001 to 15).
        learning_rate: the clients' learning rate; L = 1 / learning_rate.
        loss_key: the update metric holding F_k.
    """

    name: ClassVar[str] = "qfedavg"

    def __init__(self, q: float = 0.2, learning_rate: float = 0.1,
                 loss_key: str = "train_loss") -> None:
        if not (np.isfinite(q) and q >= 0):
            raise StrategyError(f"q must be a finite number >= 0, got {q}")
        self.lipschitz = 1.0 / positive_number("learning_rate", learning_rate)
        self.q = float(q)
        self.loss_key = str(loss_key)
        self._global: Weights = {}
        self._sum: dict[str, np.ndarray] = {}
        self._h = 0.0
        self._count = 0
        self._loss_sum = 0.0
        #: Per round: the mean loss used and the sum of h_k.
        self.last_report: dict[str, Any] = {}

    def begin(self, weights: Weights, round: int) -> None:
        self._global = weights
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in weights.items()}
        self._h = 0.0
        self._count = 0
        self._loss_sum = 0.0

    def accumulate(self, update: ClientUpdate) -> None:
        loss = update.metrics.get(self.loss_key)
        if not isinstance(loss, (int, float)) or not np.isfinite(loss) or loss < 0:
            raise StrategyError(f"q-FedAvg needs a finite loss >= 0 in the update's metrics "
                                f"{self.loss_key!r}; {update.sender!r} sent {loss!r}")
        check_compatible(self._global, update.delta)
        f = float(loss) + _EPS
        weight = f ** self.q
        sq_norm = 0.0
        for k, acc in self._sum.items():
            grad = np.multiply(update.delta[k], -self.lipschitz, dtype=np.float64)
            sq_norm += float(np.dot(grad.ravel(), grad.ravel()))
            acc += weight * grad
        self._h += self.q * f ** (self.q - 1.0) * sq_norm + self.lipschitz * weight
        self._count += 1
        self._loss_sum += float(loss)

    def finish(self) -> Weights:
        if self._count == 0 or self._h <= 0:
            self.last_report = {}
            return {k: w.copy() for k, w in self._global.items()}
        self.last_report = {"mean_loss": self._loss_sum / self._count, "h_sum": self._h}
        return apply_step(self._global, {k: -s / self._h for k, s in self._sum.items()})
