"""FedAsync (Xie, Koyejo and Gupta 2019, "Asynchronous Federated Optimization", Algorithm 1):
every arriving update is mixed into the global model with a staleness-dependent weight.

The paper's server step, for a model x_new trained from version τ and received at version t:

    x_t = (1 − α_t) x_{t−1} + α_t x_new,    α_t = α · s(t − τ)

with staleness functions s(·) (Section 5.2), for staleness s = t − τ >= 0:

    constant:    s(s) = 1
    polynomial:  s(s) = (1 + s)^(−a)
    hinge:       s(s) = 1 if s <= b else 1 / (a (s − b) + 1)

What fedbus implements, and why. Updates are deltas Δ = x_new − x_τ from the client's base
model, and the server keeps only the current model (memory O(model); it keeps no history of
versions). Substituting x_new = x_τ + Δ into the paper's step gives

    x_t = x_{t−1} + α_t Δ + α_t (x_τ − x_{t−1}).

The last term needs x_τ, which is gone; this module drops it and applies

    x_t = x_{t−1} + α_t · Δ                                   (the equation tested)

This is exact whenever s = 0 (then x_τ = x_{t−1}). For s > 0 it equals the paper's step
applied to x_new' = x_{t−1} + Δ, i.e. the client's progress replayed on the current model
instead of its stale endpoint: the stale update no longer drags the model back toward x_τ by
α_t (x_{t−1} − x_τ), while s(·) still damps it. This is the usual delta form of asynchronous
servers (FedBuff uses the same). ``num_examples`` plays no part, as in the paper.

Every accepted update moves the model, so the version increments on each ``submit``.

A counted update (``ClientUpdate.count`` = c > 1: a relay's pre-aggregate, whose ``delta`` is
the mean Δ̄ of c deltas from one base version) is c updates of that mean arriving back to
back, the j-th meeting staleness s + j:

    x_{t+c−1} = x_{t−1} + α (Σ_{j<c} s(s + j)) · Δ̄,    version += c

which is the flat result exactly for the constant staleness function, and for the others the
flat result averaged over the members' arrival order (flat, whichever member arrives j-th
gets s(s + j)). Members that would exceed ``max_staleness`` are refused, as flat.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies._async_model import VersionedModel
from strategies.base import ClientUpdate, StrategyError, Weights, positive_count

__all__ = ["STALENESS_FUNCTIONS", "FedAsync", "staleness_weight"]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


def staleness_weight(kind: str, staleness: int, a: float, b: float) -> float:
    """s(staleness) for the paper's three staleness functions."""
    if staleness < 0:
        raise StrategyError(f"staleness must be >= 0, got {staleness} (an update from a "
                            f"model version newer than the server's?)")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise StrategyError(f"unknown staleness function {kind!r}; known: {STALENESS_FUNCTIONS}")


class FedAsync(VersionedModel):
    """Staleness-weighted mixing of each update into the global model.

    Args:
        alpha: mixing hyperparameter α in (0, 1].
        staleness: ``"constant"``, ``"polynomial"`` or ``"hinge"``.
        a: exponent of ``polynomial`` (> 0) / slope of ``hinge`` (>= 0).
        b: hinge knee: updates at most ``b`` versions stale get the full α (>= 0).
        max_staleness: refuse (return ``None`` for) updates staler than this; ``None`` keeps all.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(self, alpha: float = 0.6, staleness: str = "polynomial", a: float = 0.5,
                 b: float = 4.0, max_staleness: int | None = None) -> None:
        if not 0 < alpha <= 1:
            raise StrategyError(f"alpha must be in (0, 1], got {alpha}")
        if staleness not in STALENESS_FUNCTIONS:
            raise StrategyError(f"unknown staleness function {staleness!r}; "
                                f"known: {', '.join(STALENESS_FUNCTIONS)}")
        if not (np.isfinite(a) and a >= 0) or (staleness == "polynomial" and a == 0):
            raise StrategyError(f"a must be a finite number >= 0 (> 0 for polynomial), got {a}")
        if not (np.isfinite(b) and b >= 0):
            raise StrategyError(f"b must be a finite number >= 0, got {b}")
        super().__init__(max_staleness)
        self.alpha = float(alpha)
        self.staleness = staleness
        self.a = float(a)
        self.b = float(b)

    def mixing_weight(self, staleness: int) -> float:
        """α_t = α · s(staleness)."""
        return self.alpha * staleness_weight(self.staleness, staleness, self.a, self.b)

    takes_counts: ClassVar[bool] = True

    def staleness_scale(self, staleness: int) -> float:
        return staleness_weight(self.staleness, staleness, self.a, self.b)

    def room(self, versions: int) -> int | None:
        return max(0, versions)

    def submit(self, update: ClientUpdate) -> Weights | None:
        if not self._admits(update):
            return None
        stalenesses = [update.staleness + j for j in range(positive_count("count", update.count))
                       if self.max_staleness is None
                       or update.staleness + j <= self.max_staleness]
        alpha_t = sum(self.mixing_weight(s) for s in stalenesses)
        return self._advance({
            k: (w.astype(np.float64) + alpha_t * np.asarray(update.delta[k], dtype=np.float64))
            .astype(w.dtype)
            for k, w in self._weights.items()
        }, steps=len(stalenesses))

    def state_dict(self) -> dict[str, Any]:
        return self._model_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.init(*self._model_in(state))
