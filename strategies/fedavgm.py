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
    apply_step,
    check_same_layout,
    export_tensors,
    import_tensors,
    zeros_f64,
)
from strategies.base import ClientUpdate, Strategy, StrategyError, Weights
from strategies.fedavg import WeightedDeltaMean

__all__ = ["FedAvgM"]


class FedAvgM(Strategy):
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
        if not (np.isfinite(server_lr) and server_lr > 0):
            raise StrategyError(f"server_lr must be a finite number > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise StrategyError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.weighted = bool(weighted)
        self._acc = WeightedDeltaMean()
        self._global: Weights = {}
        self._v: dict[str, np.ndarray] = {}

    @property
    def num_accumulated(self) -> int:
        return self._acc.count

    def begin(self, weights: Weights, round: int) -> None:
        if not self._v:
            self._v = zeros_f64(weights)
        check_same_layout(weights, self._v, "FedAvgM momentum buffer")
        self._global = weights
        self._acc.reset(weights)

    def accumulate(self, update: ClientUpdate) -> None:
        self._acc.add(update.delta, float(update.num_examples) if self.weighted else 1.0)

    def finish(self) -> Weights:
        if self._acc.total_weight <= 0:
            return {k: w.copy() for k, w in self._global.items()}
        mean = self._acc.mean()
        step: dict[str, np.ndarray] = {}
        for k, v in self._v.items():
            v *= self.momentum
            v += mean[k]
            step[k] = self.server_lr * v
        return apply_step(self._global, step)

    def state_dict(self) -> dict[str, Any]:
        return {"v": export_tensors(self._v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._v = import_tensors(state, "v", "FedAvgM")
