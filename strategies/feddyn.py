"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization", ICLR,
Algorithm 1): a dynamic regulariser per client plus a server state h that corrects the mean.

Server, round t, with participants P_t, m = ``num_clients`` (all clients, not just P_t) and
fedbus deltas Δ_k = θ_k^t − θ^{t−1}:

    h^t = h^{t−1} − α (1/m) Σ_{k∈P_t} (θ_k^t − θ^{t−1})  =  h^{t−1} − (α/m) Σ_k Δ_k
    θ^t = (1/|P_t|) Σ_{k∈P_t} θ_k^t − (1/α) h^t        =  θ^{t−1} + mean_k(Δ_k) − h^t/α

with h^0 = 0. Both sums are unweighted (``num_examples`` is ignored), as in the paper.

Client contract (what a trainer's task adapter must honour):
    * ``client_config(round)`` is ``{"feddyn_alpha": alpha}``.
    * Each client k keeps, across rounds and on its own side, a tensor g_k per trainable model
      tensor (the paper's ∇L_k(θ_k^{t−1})), initialised to zeros the first time it trains.
    * Receiving θ^{t−1} (the global weights, kept as a frozen copy), it minimises
          L_k(θ) − <g_k, θ> + (α/2) ||θ − θ^{t−1}||²
      i.e. adds the linear term ``-sum(g_k * θ)`` and the quadratic term
      ``(alpha/2) * ||θ - θ_global||²`` to the local loss (gradient: ∇L_k(θ) − g_k +
      α(θ − θ^{t−1})).
    * After training it sends ``delta = θ_k^t − θ^{t−1}`` and updates its own state:
          g_k ← g_k − α (θ_k^t − θ^{t−1})  =  g_k − α · delta.
    g_k never travels to the server; losing it (a client restart) only resets that client's
    regulariser to zero.

An empty round (no participants) leaves θ and h unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies._server_state import (
    MeanDeltaStep,
    check_same_layout,
    export_tensors,
    import_tensors,
    zeros_f64,
)
from strategies.base import ClientUpdate, StrategyError, Weights, positive_count, positive_number

__all__ = ["FedDyn"]


class FedDyn(MeanDeltaStep):
    """Server side of FedDyn.

    Args:
        num_clients: m, the total number of clients in the federation (not per round).
        alpha: the dynamic-regularisation coefficient α > 0 (the paper uses 0.1, 0.01, 0.001).
    """

    name: ClassVar[str] = "feddyn"

    def __init__(self, num_clients: int, alpha: float = 0.01) -> None:
        self.num_clients = positive_count("num_clients", num_clients)
        self.alpha = positive_number("alpha", alpha)
        super().__init__(weighted=False)  # every weight is 1: the mean is unweighted
        self._h: dict[str, np.ndarray] = {}

    def client_config(self, round: int) -> dict[str, Any]:
        return {"feddyn_alpha": self.alpha}

    def _ready_state(self, weights: Weights) -> None:
        if not self._h:
            self._h = zeros_f64(weights)
        check_same_layout(weights, self._h, "FedDyn server state h")

    def accumulate(self, update: ClientUpdate) -> None:
        if self._acc.count >= self.num_clients:
            raise StrategyError(f"FedDyn got more than num_clients={self.num_clients} updates "
                                f"in one round; set num_clients to the federation's size")
        super().accumulate(update)

    def _step(self, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self._acc.count
        step: dict[str, np.ndarray] = {}
        for k, h in self._h.items():
            # Σ_k Δ_k = n * mean; h ← h − (α/m) Σ_k Δ_k
            h -= (self.alpha * n / self.num_clients) * mean[k]
            step[k] = mean[k] - h / self.alpha
        return step

    def state_dict(self) -> dict[str, Any]:
        return {"h": export_tensors(self._h)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._h = import_tensors(state, "h", "FedDyn")
