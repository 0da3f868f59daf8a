"""Tier-based selection (Chai et al. 2020, "TiFL: A Tier-based Federated Learning System",
HPDC, Sec. 4): group clients by measured training latency, pick one tier per round, then
clients inside it, so a round is not paced by the slowest device of the whole population.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Feedback, Selector, StrategyError, rng_from_state, rng_state

__all__ = ["TieredSelector"]


class TieredSelector(Selector):
    """TiFL's static tier selection with credits.

    * Profiling: a node with no measured latency is untiered. Untiered available nodes are
      selected first (uniformly), so every node gets profiled (TiFL's profiling rounds); a
      tier fills the round's remaining slots.
    * Latency: an exponential moving average of ``report(duration_s=...)`` with weight
      ``latency_ema`` on the newest sample; a miss (``completed=False``) without a duration
      counts as ``miss_penalty_s``.
    * Tiers: all known nodes sorted by latency (ties by name) and cut into ``num_tiers``
      groups of near-equal size; tier 0 is the fastest. Recomputed every round.
    * Round: a tier is drawn with probability ``tier_probabilities`` (default uniform) among
      tiers that have an available member and credits left (TiFL Sec. 4.3: each tier may be
      picked at most ``credits`` times; ``None`` means unlimited; when every tier's credits are
      spent, credits are ignored). Then ``num_clients`` members are drawn uniformly from it;
      if the tier has fewer available, the rest come from the next-faster tiers, then the
      slower ones. Not implemented: TiFL's adaptive probabilities from per-tier accuracy.

    Args:
        num_clients: clients per round.
        num_tiers: number of latency tiers.
        tier_probabilities: one weight per tier (fastest first), or ``None`` for uniform.
        credits: per-tier selection budget, or ``None``.
        latency_ema: weight of the newest duration, in (0, 1].
        miss_penalty_s: latency charged for a miss with no duration; ``None`` ignores misses.
        seed: RNG seed; RNG state, latencies and credits are in ``state_dict``.
    """

    name: ClassVar[str] = "tiered"

    def __init__(self, num_clients: int = 10, num_tiers: int = 3,
                 tier_probabilities: Sequence[float] | None = None, credits: int | None = None,
                 latency_ema: float = 0.5, miss_penalty_s: float | None = None,
                 seed: int = 0) -> None:
        if int(num_clients) < 1:
            raise StrategyError(f"num_clients must be >= 1, got {num_clients}")
        if int(num_tiers) < 1:
            raise StrategyError(f"num_tiers must be >= 1, got {num_tiers}")
        if tier_probabilities is not None:
            probs = [float(p) for p in tier_probabilities]
            if len(probs) != num_tiers or any(p < 0 for p in probs) or sum(probs) <= 0:
                raise StrategyError(f"tier_probabilities must be {num_tiers} weights >= 0 with a "
                                    f"positive sum, got {list(tier_probabilities)}")
        if credits is not None and int(credits) < 1:
            raise StrategyError(f"credits must be >= 1 or None, got {credits}")
        if not 0 < latency_ema <= 1:
            raise StrategyError(f"latency_ema must be in (0, 1], got {latency_ema}")
        self.num_clients = int(num_clients)
        self.num_tiers = int(num_tiers)
        self.tier_probabilities = [1.0] * self.num_tiers if tier_probabilities is None \
            else [float(p) for p in tier_probabilities]
        self.latency_ema = float(latency_ema)
        self.miss_penalty_s = miss_penalty_s
        self._rng = np.random.default_rng(seed)
        self._latency: dict[str, float] = {}
        self._credits: list[int] | None = None if credits is None \
            else [int(credits)] * self.num_tiers
        self.last_tier: int | None = None

    def tiers(self) -> list[list[str]]:
        """Known nodes grouped by latency, fastest tier first."""
        ordered = sorted(self._latency, key=lambda n: (self._latency[n], n))
        bounds = np.linspace(0, len(ordered), self.num_tiers + 1).round().astype(int)
        return [ordered[bounds[t]:bounds[t + 1]] for t in range(self.num_tiers)]

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        k = min(self.num_clients, len(pool))
        if k == 0:
            return []
        self.last_tier = None
        profiling = self._draw([n for n in pool if n not in self._latency], k)
        if profiling and (len(profiling) == k or not self._latency):
            return sorted(profiling)
        k -= len(profiling)
        live = set(pool)
        members = [[n for n in tier if n in live] for tier in self.tiers()]
        eligible = [t for t in range(self.num_tiers)
                    if members[t] and self.tier_probabilities[t] > 0]
        if not eligible:  # every live tier has probability 0: fall back to any live tier
            eligible = [t for t in range(self.num_tiers) if members[t]]
        if not eligible:
            return sorted(profiling)
        if self._credits is not None:
            with_credit = [t for t in eligible if self._credits[t] > 0]
            eligible = with_credit or eligible
        weights = np.array([self.tier_probabilities[t] for t in eligible], dtype=np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 \
            else np.full(len(eligible), 1 / len(eligible))
        tier = eligible[int(self._rng.choice(len(eligible), p=weights))]
        self.last_tier = tier
        if self._credits is not None and self._credits[tier] > 0:
            self._credits[tier] -= 1
        chosen = self._draw(members[tier], k)
        # Top up from the faster neighbours first, then the slower ones.
        for t in [*range(tier - 1, -1, -1), *range(tier + 1, self.num_tiers)]:
            if len(chosen) >= k:
                break
            chosen += self._draw(members[t], k - len(chosen))
        return sorted(profiling + chosen)

    def _draw(self, nodes: list[str], k: int) -> list[str]:
        k = min(k, len(nodes))
        if k == 0:
            return []
        return [nodes[i] for i in self._rng.choice(len(nodes), size=k, replace=False)]

    def observe(self, feedback: Feedback) -> None:
        sample = feedback.duration_s
        if sample is None and not feedback.completed and self.miss_penalty_s is not None:
            sample = float(self.miss_penalty_s)
        if sample is None:
            return
        old = self._latency.get(feedback.node)
        self._latency[feedback.node] = float(sample) if old is None \
            else (1 - self.latency_ema) * old + self.latency_ema * float(sample)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng), "latency": dict(self._latency),
                "credits": None if self._credits is None else list(self._credits),
                "last_tier": self.last_tier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._latency = {str(n): float(v) for n, v in state["latency"].items()}
        credits = state.get("credits")
        self._credits = None if credits is None else [int(c) for c in credits]
        self.last_tier = state.get("last_tier")
