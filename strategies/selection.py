"""Basic client selection: everyone, or a seeded uniform random fraction with a minimum."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Selector, StrategyError, rng_from_state, rng_state

__all__ = ["AllSelector", "RandomSelector"]


class AllSelector(Selector):
    """Every available client, every round."""

    name: ClassVar[str] = "all"

    def select(self, available: Sequence[str], round: int) -> list[str]:
        return sorted(set(available))


class RandomSelector(Selector):
    """Uniformly ``ceil(fraction * available)`` clients, at least ``min_clients`` (FedAvg's C).

    Args:
        fraction: share of available clients per round, in (0, 1].
        min_clients: lower bound (capped by how many are available).
        seed: RNG seed; the RNG state is part of ``state_dict`` so a restart picks the same.
    """

    name: ClassVar[str] = "random"

    def __init__(self, fraction: float = 0.1, min_clients: int = 1, seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise StrategyError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise StrategyError(f"min_clients must be >= 1, got {min_clients}")
        self.fraction = float(fraction)
        self.min_clients = int(min_clients)
        self._rng = np.random.default_rng(seed)

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        k = min(len(pool), max(self.min_clients, math.ceil(self.fraction * len(pool))))
        idx = self._rng.choice(len(pool), size=k, replace=False)
        return sorted(pool[i] for i in idx)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
