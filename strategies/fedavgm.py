"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", Section 3).

The paper writes the server step with the pseudo-gradient Δw = w - mean(local) as
``v <- beta v + Δw ; w <- w - v``. fedbus deltas have the opposite sign (local - global), so
with Δ̄_t the example-weighted mean delta of round t this module implements

    v_t     = beta * v_{t-1} + Δ̄_t            (v_{-1} = 0)
    w_{t+1} = w_t + server_lr * v_t

``server_lr = 1`` is the paper's update; ``momentum = 0`` and ``server_lr = 1`` is FedAvg.
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
from strategies.base import StrategyError, Weights, positive_number

__all__ = ["FedAvgM"]


class FedAvgM(MeanDeltaStep):
    """Server momentum over the example-weighted mean delta.

    Args:
        server_lr: server learning rate (the paper uses 1).
        momentum: beta in [0, 1).
        weighted: weight clients by ``num_examples`` (True) or equally.

    A round in which no update (or only zero-weight updates) arrived leaves both the model and
    the momentum buffer untouched: the server takes no step without a pseudo-gradient.
    """

    name: ClassVar[str] = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9,
                 weighted: bool = True) -> None:
        self.server_lr = positive_number("server_lr", server_lr)
        if not 0 <= momentum < 1:
            raise StrategyError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        super().__init__(weighted)
        self._v: dict[str, np.ndarray] = {}

    def _ready_state(self, weights: Weights) -> None:
        if not self._v:
            self._v = zeros_f64(weights)
        check_same_layout(weights, self._v, "FedAvgM momentum buffer")

    def _step(self, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        step: dict[str, np.ndarray] = {}
        for k, v in self._v.items():
            v *= self.momentum
            v += mean[k]
            step[k] = self.server_lr * v
        return step

    def state_dict(self) -> dict[str, Any]:
        return {"v": export_tensors(self._v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._v = import_tensors(state, "v", "FedAvgM")
