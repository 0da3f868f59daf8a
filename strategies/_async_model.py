"""What the asynchronous strategies that keep the global model themselves share: the model and
its version, a read-only view of it, the checks every update passes first, and their state.

FedAsync and FedBuff differ only in how an admitted update moves the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from strategies.base import AsyncStrategy, ClientUpdate, StrategyError, Weights, check_compatible

__all__ = ["VersionedModel"]


class VersionedModel(AsyncStrategy):
    """An ``AsyncStrategy`` holding the global model and its version.

    Args:
        max_staleness: refuse updates staler than this; ``None`` keeps all.
    """

    def __init__(self, max_staleness: int | None = None) -> None:
        if max_staleness is not None and max_staleness < 0:
            raise StrategyError(f"max_staleness must be >= 0 or omitted, got {max_staleness}")
        self.max_staleness = max_staleness
        self._weights: Weights = {}
        self._version = 0

    def init(self, weights: Weights, version: int = 0) -> None:
        self._weights = {k: np.array(w, copy=True) for k, w in weights.items()}
        self._version = int(version)

    @property
    def version(self) -> int:
        return self._version

    @property
    def weights(self) -> Weights:
        out: Weights = {}
        for k, w in self._weights.items():
            view = w.view()
            view.flags.writeable = False
            out[k] = view
        return out

    def _admits(self, update: ClientUpdate) -> bool:
        """Raise unless there is a model and ``update`` fits it; False when it is too stale
        (``submit`` then returns ``None`` without using it)."""
        if not self._weights:
            raise StrategyError(f"{type(self).__name__}.submit before init(): no global "
                                "model yet")
        check_compatible(self._weights, update.delta)
        return self.max_staleness is None or update.staleness <= self.max_staleness

    def _advance(self, weights: Weights, steps: int = 1) -> Weights:
        """Make ``weights`` the version ``steps`` after this one (a counted update may make
        several at once); a copy of it for the caller."""
        self._weights = weights
        self._version += steps
        return {k: w.copy() for k, w in self._weights.items()}

    def _model_state(self) -> dict[str, Any]:
        return {"version": self._version,
                "weights": {k: w.copy() for k, w in self._weights.items()}}

    def _model_in(self, state: Mapping[str, Any], *more: str) -> tuple[dict[str, Any], int]:
        """The model and version ``state`` holds, once it is checked to hold them and the keys
        ``more``."""
        owner = type(self).__name__
        missing = {"version", "weights", *more} - set(state)
        if missing:
            raise StrategyError(f"{owner} state lacks {sorted(missing)}; got {sorted(state)}")
        weights = state["weights"]
        if not isinstance(weights, Mapping) or not all(
                isinstance(w, np.ndarray) for w in weights.values()):
            raise StrategyError(f"{owner} state 'weights' must map names to numpy arrays")
        return dict(weights), int(state["version"])
