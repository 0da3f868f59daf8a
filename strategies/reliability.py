"""Reliability-aware selection: skip nodes that keep missing the round deadline, but give each
skipped node an occasional second chance so one that recovered is taken back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Feedback, Selector, StrategyError, rng_from_state, rng_state

__all__ = ["ReliabilitySelector"]


class ReliabilitySelector(Selector):
    """Select by exponentially decayed deadline-miss rate.

    Each ``report`` updates the node's miss rate r <- decay * r + (1 - decay) * miss, where
    miss = ``not completed`` (a node never reported has r = 0). A node with r > ``threshold``
    is *flaky* and skipped, except that each round each flaky available node is re-admitted
    with probability ``explore_prob`` (seeded), so a recovered node can lower its rate again.
    From the admitted nodes, ``num_clients`` are drawn uniformly (all of them when ``None``).
    The result may hold fewer than ``num_clients`` nodes; it is empty only when ``available``
    is: if every available node is flaky and none was re-admitted, the least flaky is taken.

    Args:
        num_clients: clients per round, or ``None`` for every admitted node.
        decay: weight of the old rate, in [0, 1).
        threshold: miss rate above which a node is skipped, in [0, 1).
        explore_prob: per-round chance a flaky node is tried anyway, in [0, 1].
        seed: RNG seed; RNG state and miss rates are in ``state_dict``.
    """

    name: ClassVar[str] = "reliability"

    def __init__(self, num_clients: int | None = None, decay: float = 0.8,
                 threshold: float = 0.5, explore_prob: float = 0.1, seed: int = 0) -> None:
        if num_clients is not None and int(num_clients) < 1:
            raise StrategyError(f"num_clients must be >= 1 or None, got {num_clients}")
        if not 0 <= decay < 1:
            raise StrategyError(f"decay must be in [0, 1), got {decay}")
        if not 0 <= threshold < 1:
            raise StrategyError(f"threshold must be in [0, 1), got {threshold}")
        if not 0 <= explore_prob <= 1:
            raise StrategyError(f"explore_prob must be in [0, 1], got {explore_prob}")
        self.num_clients = None if num_clients is None else int(num_clients)
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.explore_prob = float(explore_prob)
        self._rng = np.random.default_rng(seed)
        self._miss: dict[str, float] = {}

    def miss_rate(self, node: str) -> float:
        return self._miss.get(node, 0.0)

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        if not pool:
            return []
        flaky = [n for n in pool if self.miss_rate(n) > self.threshold]
        # One draw per flaky node, in name order, so the stream does not depend on the rest.
        tries = self._rng.random(len(flaky))
        retried = {n for n, u in zip(flaky, tries, strict=True) if u < self.explore_prob}
        admitted = [n for n in pool if n not in flaky or n in retried]
        if not admitted:
            admitted = [min(pool, key=lambda n: (self.miss_rate(n), n))]
        if self.num_clients is None or len(admitted) <= self.num_clients:
            return admitted
        idx = self._rng.choice(len(admitted), size=self.num_clients, replace=False)
        return sorted(admitted[i] for i in idx)

    def observe(self, feedback: Feedback) -> None:
        miss = 0.0 if feedback.completed else 1.0
        node = feedback.node
        self._miss[node] = self.decay * self.miss_rate(node) + (1 - self.decay) * miss

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng), "miss_rate": dict(self._miss)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._miss = {str(n): float(v) for n, v in state["miss_rate"].items()}
