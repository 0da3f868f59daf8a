"""Helpers shared by strategies that keep model-shaped server state (moments, h, c, buffers),
and ``MeanDeltaStep``, the round of those that step from the round's mean delta.

All such state is float64 (accumulate in float64, cast only the returned model), is copied on
the way in and out of ``state_dict`` so callers never alias it, and is checked against the
model's names and shapes before use so a checkpoint from another model fails loudly.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from strategies.base import StrategyError, Weights
from strategies.fedavg import MeanRound

__all__ = [
    "MeanDeltaStep",
    "apply_step",
    "check_same_layout",
    "export_tensors",
    "import_tensors",
    "zeros_f64",
]


def zeros_f64(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, dtype=np.float64) for k, v in weights.items()}


def export_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fresh copy for ``state_dict`` (the caller may mutate or encode it freely)."""
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in tensors.items()}


def import_tensors(state: Mapping[str, Any], key: str, owner: str) -> dict[str, np.ndarray]:
    """Read ``state[key]`` as a ``{name: float64 array}`` dict (copied, writable)."""
    if key not in state:
        raise StrategyError(f"{owner} state lacks {key!r}; got keys {sorted(state)}")
    node = state[key]
    if not isinstance(node, Mapping):
        raise StrategyError(f"{owner} state {key!r} must map tensor names to arrays, "
                            f"got {type(node).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, arr in node.items():
        if not isinstance(arr, np.ndarray):
            raise StrategyError(f"{owner} state {key}/{name} is {type(arr).__name__}, "
                                f"expected a numpy array")
        out[str(name)] = np.array(arr, dtype=np.float64, copy=True)
    return out


def check_same_layout(model: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray],
                      what: str) -> None:
    """Raise unless ``tensors`` has exactly the model's names and shapes."""
    if model.keys() != tensors.keys():
        missing = sorted(set(model) - set(tensors))
        extra = sorted(set(tensors) - set(model))
        raise StrategyError(f"{what} does not match the model: missing {missing}, extra {extra} "
                            f"(was the state restored from a different model?)")
    for name, w in model.items():
        if tensors[name].shape != w.shape:
            raise StrategyError(f"{what} tensor {name!r} has shape {tensors[name].shape}, "
                                f"model has {w.shape}")


def apply_step(weights: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> Weights:
    """Fresh ``weights + step`` computed in float64 and cast back to each tensor's dtype."""
    return {k: (w.astype(np.float64) + step[k]).astype(w.dtype) for k, w in weights.items()}


class MeanDeltaStep(MeanRound):
    """FedAvg's round (``MeanRound``) ending with one server step from the mean delta (FedAvgM,
    FedOpt, FedDyn).

    Subclasses keep the model-shaped state: ``_ready_state`` makes it on the first round and
    checks it fits the model, ``_step`` turns the mean into the step added to the model. A
    round in which no weight arrived takes no step and leaves the state untouched.
    """

    def begin(self, weights: Weights, round: int) -> None:
        self._ready_state(weights)
        super().begin(weights, round)

    def finish(self) -> Weights:
        if self._acc.total_weight <= 0:
            return {k: w.copy() for k, w in self._global.items()}
        return apply_step(self._global, self._step(self._acc.mean()))

    @abstractmethod
    def _ready_state(self, weights: Weights) -> None:
        """Make the server state for ``weights`` if there is none; check that it fits."""

    @abstractmethod
    def _step(self, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Update the server state from the round's mean delta; the step for the model."""

