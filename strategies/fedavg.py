"""FedAvg (McMahan et al. 2017, Algorithm 1): the example-weighted mean of client models.

Streamed: w_{t+1} = w_t + sum_k n_k * delta_k / sum_k n_k, accumulated in float64 so memory is
one model-sized running sum no matter how many clients report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from strategies.base import ClientUpdate, Strategy, StrategyError, Weights, check_compatible

__all__ = ["FedAvg", "MeanRound", "WeightedDeltaMean"]


#: Elements folded at a time: the float64 scratch (512 KiB) stays in cache, where a whole-tensor
#: ``np.multiply(..., dtype=float64)`` would allocate and stream a model-sized temporary.
_BLOCK = 1 << 16


def _fold(acc: np.ndarray, delta: np.ndarray, weight: float) -> None:
    """``acc += weight * delta`` in float64, in cache-sized blocks, no model-sized temporary."""
    if acc.size <= _BLOCK:
        acc += np.multiply(delta, weight, dtype=np.float64)
        return
    flat_acc = acc.reshape(-1)  # acc is ours and contiguous: a view
    flat_delta = np.ascontiguousarray(delta).reshape(-1)
    scratch = np.empty(_BLOCK, dtype=np.float64)
    for start in range(0, flat_acc.size, _BLOCK):
        stop = min(start + _BLOCK, flat_acc.size)
        part = scratch[: stop - start]
        np.multiply(flat_delta[start:stop], weight, out=part, dtype=np.float64)
        flat_acc[start:stop] += part


class WeightedDeltaMean:
    """Running example-weighted mean of deltas; the building block of the FedAvg family."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._weights: Weights = {}
        self.total_weight = 0.0
        self.count = 0

    def reset(self, weights: Weights) -> None:
        self._weights = weights
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in weights.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not np.isfinite(weight) or weight < 0:
            raise StrategyError(f"update weight must be finite and >= 0, got {weight}")
        check_compatible(self._weights, delta)
        for k, acc in self._sum.items():
            _fold(acc, delta[k], weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta in float64 (zeros when nothing, or only weight 0, came)."""
        if self.total_weight <= 0:
            return {k: np.zeros_like(v) for k, v in self._sum.items()}
        return {k: v / self.total_weight for k, v in self._sum.items()}


class MeanRound(Strategy):
    """A round that folds every update into one running mean delta, example-weighted when
    ``weighted``: FedAvg's round, and that of the strategies that step from the mean delta
    (``strategies._server_state.MeanDeltaStep``). Subclasses write ``finish``."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = bool(weighted)
        self._acc = WeightedDeltaMean()
        self._global: Weights = {}

    @property
    def num_accumulated(self) -> int:
        return self._acc.count

    def begin(self, weights: Weights, round: int) -> None:
        self._global = weights
        self._acc.reset(weights)

    def accumulate(self, update: ClientUpdate) -> None:
        self._acc.add(update.delta, float(update.num_examples) if self.weighted else 1.0)


class FedAvg(MeanRound):
    """Example-weighted averaging of client deltas.

    Args:
        weighted: weight each client by ``num_examples`` (True, the paper) or equally.
    """

    name: ClassVar[str] = "fedavg"

    def finish(self) -> Weights:
        mean = self._acc.mean()
        return {k: (w + mean[k]).astype(w.dtype) for k, w in self._global.items()}
