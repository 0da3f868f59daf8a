"""Oort guided participant selection (Lai et al. 2021, "Oort: Efficient Federated Learning via
Guided Participant Selection", OSDI, Sec. 4 and Algorithm 1): favour clients whose data is
informative and whose training is fast, while still exploring clients never tried.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.base import Feedback, Selector, StrategyError, rng_from_state, rng_state

__all__ = ["OortSelector", "statistical_utility"]


def statistical_utility(squared_loss_sum: float, num_samples: int) -> float:
    """Oort's statistical utility U_i = |B_i| * sqrt(sum_k loss_k^2 / |B_i|) (Eq. 1 / Sec. 4.2):
    what a trainer reports as ``utility`` after training on |B_i| samples."""
    if num_samples <= 0:
        return 0.0
    return float(num_samples * math.sqrt(max(squared_loss_sum, 0.0) / num_samples))


class OortSelector(Selector):
    """Exploit high-utility, fast clients; explore a decaying share of unexplored ones.

    For an explored client i at round R (Algorithm 1, lines 6-12)::

        util(i) = U_i + sqrt(0.1 * log R / L_i)            (staleness bonus, L_i = last round i
                                                            was selected)
        util(i) *= (T / t_i) ** alpha   if t_i > T        (system-utility penalty)

    ``U_i`` comes from ``report(utility=...)`` (see :func:`statistical_utility`), ``t_i`` from
    ``report(duration_s=...)``. T is ``preferred_duration_s`` or, when ``None``, the
    ``duration_quantile`` of all measured durations. Of ``num_clients`` slots,
    ``round(num_clients * (1 - epsilon))`` are exploited: every explored client whose util is at
    least ``cutoff`` times the k-th best util is a candidate, and k are drawn from them with
    probability proportional to util. The rest are explored uniformly among clients with no
    utility yet; unused slots of either kind go to the other. epsilon starts at
    ``exploration_factor`` and is multiplied by ``exploration_decay`` each round, down to
    ``min_exploration``. Not implemented: Oort's pacer (T adapts to the round's accuracy
    progress) and its blacklist of over-selected clients.

    Args:
        num_clients: clients per round (fewer when fewer are available).
        exploration_factor: initial epsilon, in [0, 1].
        exploration_decay: multiplies epsilon after each round, in (0, 1].
        min_exploration: floor of epsilon.
        preferred_duration_s: T; ``None`` derives it from measured durations.
        duration_quantile: quantile of measured durations used as T when it is derived.
        straggler_penalty: alpha.
        cutoff: c, in (0, 1].
        seed: RNG seed; RNG state and every per-client record are in ``state_dict``.
    """

    name: ClassVar[str] = "oort"

    def __init__(self, num_clients: int = 10, exploration_factor: float = 0.9,
                 exploration_decay: float = 0.98, min_exploration: float = 0.2,
                 preferred_duration_s: float | None = None, duration_quantile: float = 0.5,
                 straggler_penalty: float = 2.0, cutoff: float = 0.95, seed: int = 0) -> None:
        if int(num_clients) < 1:
            raise StrategyError(f"num_clients must be >= 1, got {num_clients}")
        for pname, v in (("exploration_factor", exploration_factor),
                         ("min_exploration", min_exploration),
                         ("duration_quantile", duration_quantile)):
            if not 0 <= v <= 1:
                raise StrategyError(f"{pname} must be in [0, 1], got {v}")
        if not 0 < exploration_decay <= 1:
            raise StrategyError(f"exploration_decay must be in (0, 1], got {exploration_decay}")
        if not 0 < cutoff <= 1:
            raise StrategyError(f"cutoff must be in (0, 1], got {cutoff}")
        if preferred_duration_s is not None and not preferred_duration_s > 0:
            raise StrategyError(f"preferred_duration_s must be > 0, got {preferred_duration_s}")
        if straggler_penalty < 0:
            raise StrategyError(f"straggler_penalty must be >= 0, got {straggler_penalty}")
        self.num_clients = int(num_clients)
        self.exploration_decay = float(exploration_decay)
        self.min_exploration = float(min_exploration)
        self.preferred_duration_s = preferred_duration_s
        self.duration_quantile = float(duration_quantile)
        self.straggler_penalty = float(straggler_penalty)
        self.cutoff = float(cutoff)
        self._epsilon = float(exploration_factor)
        self._rng = np.random.default_rng(seed)
        # node -> {"utility": float | None, "duration": float | None, "last_round": int}
        self._clients: dict[str, dict[str, Any]] = {}

    @property
    def epsilon(self) -> float:
        return self._epsilon

    def _record(self, node: str) -> dict[str, Any]:
        return self._clients.setdefault(node, {"utility": None, "duration": None,
                                               "last_round": 0})

    def _preferred_duration(self) -> float | None:
        if self.preferred_duration_s is not None:
            return float(self.preferred_duration_s)
        durations = [r["duration"] for r in self._clients.values() if r["duration"] is not None]
        return float(np.quantile(durations, self.duration_quantile)) if durations else None

    def scores(self, nodes: Sequence[str], round: int) -> dict[str, float]:
        """util(i) at ``round`` for the explored nodes among ``nodes``."""
        t_pref = self._preferred_duration()
        log_r = math.log(max(round, 1))
        out: dict[str, float] = {}
        for node in nodes:
            rec = self._clients.get(node)
            if rec is None or rec["utility"] is None:
                continue
            util = float(rec["utility"])
            util += math.sqrt(0.1 * log_r / max(int(rec["last_round"]), 1))
            dur = rec["duration"]
            if t_pref is not None and dur is not None and dur > t_pref:
                util *= (t_pref / dur) ** self.straggler_penalty
            out[node] = util
        return out

    def select(self, available: Sequence[str], round: int) -> list[str]:
        pool = sorted(set(available))
        k = min(self.num_clients, len(pool))
        util = self.scores(pool, round)
        explored = sorted(util, key=lambda n: (-util[n], n))
        unexplored = [n for n in pool if n not in util]
        n_exploit = min(len(explored), _round_half_up(k * (1 - self._epsilon)))
        n_explore = min(len(unexplored), k - n_exploit)
        n_exploit = min(len(explored), k - n_explore)  # give unused exploration slots back

        chosen: list[str] = []
        if n_exploit:
            threshold = self.cutoff * util[explored[n_exploit - 1]]
            cands = [n for n in explored if util[n] >= threshold]
            p = np.array([max(util[n], 1e-12) for n in cands])
            idx = self._rng.choice(len(cands), size=n_exploit, replace=False, p=p / p.sum())
            chosen += [cands[i] for i in idx]
        if n_explore:
            idx = self._rng.choice(len(unexplored), size=n_explore, replace=False)
            chosen += [unexplored[i] for i in idx]
        for node in chosen:
            self._record(node)["last_round"] = int(round)
        self._epsilon = max(self.min_exploration, self._epsilon * self.exploration_decay)
        return sorted(chosen)

    def observe(self, feedback: Feedback) -> None:
        rec = self._record(feedback.node)
        if feedback.duration_s is not None:
            rec["duration"] = float(feedback.duration_s)
        if feedback.utility is not None and feedback.completed:
            rec["utility"] = float(feedback.utility)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng), "epsilon": self._epsilon,
                "clients": {n: dict(r) for n, r in self._clients.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._epsilon = float(state["epsilon"])
        self._clients = {str(n): dict(r) for n, r in state["clients"].items()}


def _round_half_up(x: float) -> int:
    """Python's round() is banker's rounding; slot counts should not depend on parity."""
    return math.floor(x + 0.5)
