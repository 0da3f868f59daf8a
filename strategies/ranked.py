"""Selection by a ranking computed elsewhere, e.g. the store's ``scheduling`` workload (update
similarity to the aggregate, loss or accuracy): the best-ranked clients, plus a seeded share
of others so that clients never ranked (or ranked low once) get another chance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Selector, StrategyError, rng_from_state, rng_state

__all__ = ["RankedSelector"]


class RankedSelector(Selector):
    """``num_clients`` a round: ``round(num_clients * (1 - explore))`` by score, highest first
    (ties by id), the rest uniformly among the others; unused slots of one kind go to the
    other.

    Args:
        ranking: ``{client: score}`` (higher is preferred) or client ids, best first; the
            store's ``fedbus query MANIFEST scheduling`` prints ``scores`` in this form.
        num_clients: clients per round (fewer when fewer are available).
        explore: share of the slots drawn at random among the rest, in [0, 1].
        seed: RNG seed; the RNG state and the ranking are in ``state_dict``.
        store: a store node to ask for a fresh ranking before every round (its
            ``scheduling`` workload ``by`` ``by`` over ``window`` rounds), waiting at most
            ``timeout_s``; when it does not answer in time the previous ranking stays
            (counted in ``fallbacks``). The asking is the aggregator's (a selector is pure).
    """

    name: ClassVar[str] = "ranked"

    def __init__(self, ranking: Mapping[str, float] | Sequence[str] = (), num_clients: int = 10,
                 explore: float = 0.1, seed: int = 0, store: str | None = None,
                 by: str = "similarity", window: int = 3, timeout_s: float = 1.0) -> None:
        if int(num_clients) < 1:
            raise StrategyError(f"num_clients must be >= 1, got {num_clients}")
        if not 0 <= explore <= 1:
            raise StrategyError(f"explore must be in [0, 1], got {explore}")
        if store is not None and not isinstance(store, str):
            raise StrategyError(f"store must be a store node id, got {store!r}")
        if by not in ("similarity", "loss", "accuracy"):
            raise StrategyError(f"by must be similarity, loss or accuracy, got {by!r}")
        if int(window) < 1 or not 0 < float(timeout_s) <= 60:
            raise StrategyError(f"window must be >= 1 and timeout_s in (0, 60], got "
                                f"{window}, {timeout_s}")
        self.store = store
        self.by = by
        self.window = int(window)
        self.timeout_s = float(timeout_s)
        #: Fresh rankings taken from the store; rounds that went on without one (the store
        #: slow, dead or with nothing yet), by reason.
        self.refreshes = 0
        self.fallbacks: dict[str, int] = {}
        self.num_clients = int(num_clients)
        self.explore = float(explore)
        self._rng = np.random.default_rng(seed)
        self.scores: dict[str, float] = {}
        self.set_ranking(ranking)

    def set_ranking(self, ranking: Mapping[str, float] | Sequence[str]) -> None:
        """Replace the ranking (say, with a fresh answer of the store)."""
        if isinstance(ranking, Mapping):
            scores = {str(k): float(v) for k, v in ranking.items()}
        elif isinstance(ranking, (list, tuple)):
            scores = {str(c): float(len(ranking) - i) for i, c in enumerate(ranking)}
        else:
            raise StrategyError(f"ranking must map clients to scores or list clients, got "
                                f"{type(ranking).__name__}")
        if not all(np.isfinite(v) for v in scores.values()):
            raise StrategyError("ranking scores must be finite numbers")
        self.scores = scores

    def store_query(self) -> dict[str, Any] | None:
        """The ``scheduling`` arguments to ask ``store`` with (None: no store to ask)."""
        if self.store is None:
            return None
        # higher scores are preferred: by loss, the clients with the most left to learn
        return {"by": self.by, "window": self.window, "order": "desc"}

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        k = min(self.num_clients, len(pool))
        ranked = sorted((c for c in pool if c in self.scores),
                        key=lambda c: (-self.scores[c], c))
        exploit = min(len(ranked), k - int(round_half_up(k * self.explore)))
        picked = ranked[:exploit]
        rest = [c for c in pool if c not in set(picked)]
        extra = k - len(picked)
        if extra > 0 and rest:
            idx = self._rng.choice(len(rest), size=min(extra, len(rest)), replace=False)
            picked += [rest[i] for i in idx]
        return sorted(picked)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng), "scores": dict(self.scores)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self.scores = {str(k): float(v) for k, v in state.get("scores", {}).items()}


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
