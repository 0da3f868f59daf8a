"""Basic client selection: everyone, a seeded uniform random fraction with a minimum, or
"keep C in flight" for buffered asynchronous training (FedBuff)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Feedback, Selector, StrategyError, rng_from_state, rng_state

__all__ = ["AllSelector", "InFlightSelector", "RandomSelector"]


class AllSelector(Selector):
    """Every available client, every round."""

    name: ClassVar[str] = "all"

    def select(self, available: Sequence[str], round: int) -> list[str]:
        return sorted(set(available))


class RandomSelector(Selector):
    """Uniformly ``ceil(fraction * available)`` clients, at least ``min_clients`` (FedAvg's C),
    or exactly ``count`` clients a round (a simulation's ``per_round``).

    Args:
        fraction: share of available clients per round, in (0, 1].
        min_clients: lower bound (capped by how many are available).
        seed: RNG seed; the RNG state is part of ``state_dict`` so a restart picks the same.
        count: a fixed number a round instead of a fraction (capped by how many are
            available); ``None`` uses ``fraction``.
    """

    name: ClassVar[str] = "random"

    def __init__(self, fraction: float = 0.1, min_clients: int = 1, seed: int = 0,
                 count: int | None = None) -> None:
        if not 0 < fraction <= 1:
            raise StrategyError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise StrategyError(f"min_clients must be >= 1, got {min_clients}")
        if count is not None and (isinstance(count, bool) or int(count) != count or count < 1):
            raise StrategyError(f"count must be an integer >= 1 or omitted, got {count}")
        self.fraction = float(fraction)
        self.min_clients = int(min_clients)
        self.count = None if count is None else int(count)
        self._rng = np.random.default_rng(seed)

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        if self.count is not None:
            k = min(len(pool), self.count)
        else:
            k = min(len(pool), max(self.min_clients, math.ceil(self.fraction * len(pool))))
        idx = self._rng.choice(len(pool), size=k, replace=False)
        return sorted(pool[i] for i in idx)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])


class InFlightSelector(Selector):
    """Keep ``concurrency`` clients training at once (FedBuff, Nguyen et al. 2022, Alg. 1:
    the server keeps C clients busy and refills as updates land).

    Contract:

    * ``available`` is every live node, busy or idle. A node the selector put in flight that
      is missing from ``available`` is presumed lost and its slot freed.
    * ``select(available, version)`` returns only *newly* started nodes: up to
      ``concurrency - len(in_flight)`` idle nodes (seeded uniform choice, sorted), and marks
      them in flight. It returns ``[]`` when all slots are busy. ``round`` is the model
      version the new nodes start from; it is not otherwise used.
    * ``report(node, ..., completed=True or False)`` frees that node's slot: it delivered, or
      it failed or timed out. A report for a node not in flight is ignored (duplicates, late).

    Args:
        concurrency: C, the number of clients kept in flight.
        seed: RNG seed; the RNG state and the in-flight set are in ``state_dict``.
    """

    name: ClassVar[str] = "inflight"

    def __init__(self, concurrency: int = 10, seed: int = 0) -> None:
        if int(concurrency) < 1:
            raise StrategyError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = int(concurrency)
        self._rng = np.random.default_rng(seed)
        self._in_flight: set[str] = set()

    @property
    def in_flight(self) -> list[str]:
        return sorted(self._in_flight)

    def select(self, available: Sequence[str], round: int) -> list[str]:
        live = set(available)
        self._in_flight &= live
        idle = sorted(live - self._in_flight)
        k = min(len(idle), self.concurrency - len(self._in_flight))
        if k <= 0:
            return []
        picked = sorted(idle[i] for i in self._rng.choice(len(idle), size=k, replace=False))
        self._in_flight.update(picked)
        return picked

    def observe(self, feedback: Feedback) -> None:
        self._in_flight.discard(feedback.node)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng), "in_flight": sorted(self._in_flight)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._in_flight = set(state.get("in_flight", []))
