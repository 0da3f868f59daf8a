"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", Algorithm 2).

FedProx changes the *client* objective, not the server: each selected client k approximately
minimises, from the global model w^t it received,

    h_k(w; w^t) = F_k(w) + (mu / 2) * ||w - w^t||^2                       (Eq. 2)

and the server averages the results exactly as FedAvg does.

Client contract (what a trainer's task adapter must honour):
    * ``client_config(round)`` is ``{"proximal_mu": mu}``. When the key is present and mu > 0
      the trainer adds ``(mu / 2) * sum over all trainable tensors of ||w - w_global||^2`` to
      every local minibatch loss, where ``w_global`` is a frozen copy of the weights it
      received for this round (not updated during local training). Its gradient is
      ``mu * (w - w_global)``.
    * mu = 0 (or the key absent) is plain local training: FedProx reduces to FedAvg.
    * The update sent back is the usual ``delta = w_local - w_global`` with ``num_examples``.
      FedProx tolerates partial work (fewer local epochs on stragglers); send what was done.

Server side: the paper samples clients with probability p_k ∝ n_k and averages uniformly;
with uniform sampling (what fedbus selectors do) the unbiased equivalent is the
example-weighted mean, the default here. ``weighted=False`` gives the uniform mean.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from strategies.base import StrategyError
from strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg on the server plus a proximal term ``proximal_mu`` sent to the clients.

    Args:
        proximal_mu: mu >= 0, the proximal coefficient (the paper tunes it in
            {0.001, 0.01, 0.1, 0.5, 1}).
        weighted: weight clients by ``num_examples`` (True) or equally.
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, weighted: bool = True) -> None:
        if not (np.isfinite(proximal_mu) and proximal_mu >= 0):
            raise StrategyError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
        super().__init__(weighted=weighted)
        self.proximal_mu = float(proximal_mu)

    def client_config(self, round: int) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
