"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS, Algorithm 1): asynchronous updates are buffered and applied K at a time.

Each arriving delta Δ_i, computed from a model ``s_i`` versions old, is scaled by the paper's
staleness weight 1/sqrt(1 + s_i) and added to a running sum; when K updates are in:

    Δ̄ = (1/K) Σ_{i=1..K} Δ_i / sqrt(1 + s_i)
    w^{t+1} = w^t + η_g Δ̄          (the paper's w − η_g Δ̄ with its Δ = w_start − w_local)
    t ← t + 1, buffer cleared

The buffer is one float64 model-sized sum (memory O(model) whatever K is) and is part of
``state_dict``, so a checkpoint taken mid-buffer resumes with the same buffered updates.
``num_examples`` plays no part, as in the paper.

A counted update (``ClientUpdate.count`` = c > 1: a relay's pre-aggregate, whose ``delta`` is
the mean of c deltas from one base version) is c updates of that mean arriving back to back:
c · Δ/sqrt(1 + s) joins the sum and counts c towards K. Where it would overflow the buffer, the
buffer takes what it lacks, the model steps, and the rest opens the next buffer one version
staler (s + 1), exactly as its members would have arrived one by one; so a counted update is
the flat sum of its members whenever it fits in the buffer it lands in, and the flat result
averaged over the members' arrival order when it straddles two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies._async_model import VersionedModel
from strategies._server_state import check_same_layout, export_tensors, import_tensors, zeros_f64
from strategies.base import ClientUpdate, StrategyError, Weights, positive_count, positive_number

__all__ = ["FedBuff"]


class FedBuff(VersionedModel):
    """Buffered asynchronous aggregation.

    Args:
        buffer_size: K, updates per server step (the paper uses 10).
        server_lr: η_g.
        staleness_weighting: scale each delta by 1/sqrt(1 + staleness) (the paper) or not.
        max_staleness: refuse (return ``None`` for, without buffering) updates staler than
            this; ``None`` keeps all.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0,
                 staleness_weighting: bool = True, max_staleness: int | None = None) -> None:
        self.buffer_size = positive_count("buffer_size", buffer_size)
        self.server_lr = positive_number("server_lr", server_lr)
        super().__init__(max_staleness)
        self.staleness_weighting = bool(staleness_weighting)
        self._sum: dict[str, np.ndarray] = {}
        self._count = 0

    def init(self, weights: Weights, version: int = 0) -> None:
        super().init(weights, version)
        self._sum = zeros_f64(weights)
        self._count = 0

    @property
    def num_buffered(self) -> int:
        return self._count

    def staleness_factor(self, staleness: int) -> float:
        if staleness < 0:
            raise StrategyError(f"staleness must be >= 0, got {staleness} (an update from a "
                                f"model version newer than the server's?)")
        return 1.0 / math.sqrt(1.0 + staleness) if self.staleness_weighting else 1.0

    takes_counts: ClassVar[bool] = True

    def staleness_scale(self, staleness: int) -> float:
        return self.staleness_factor(staleness)

    def room(self, versions: int) -> int | None:
        return max(0, versions * self.buffer_size - self._count)

    def submit(self, update: ClientUpdate) -> Weights | None:
        if not self._admits(update):
            return None
        left = positive_count("count", update.count)
        staleness = update.staleness
        moved: Weights | None = None
        while left > 0 and (self.max_staleness is None or staleness <= self.max_staleness):
            take = min(left, self.buffer_size - self._count)
            factor = take * self.staleness_factor(staleness)
            for k, acc in self._sum.items():
                np.add(acc, np.multiply(update.delta[k], factor, dtype=np.float64), out=acc)
            self._count += take
            left -= take
            if self._count < self.buffer_size:
                break
            moved = self._step()
            staleness += 1  # the rest of a counted update meets the next version
        return moved

    def _step(self) -> Weights:
        scale = self.server_lr / self.buffer_size
        moved = self._advance({k: (w.astype(np.float64) + scale * self._sum[k]).astype(w.dtype)
                               for k, w in self._weights.items()})
        for acc in self._sum.values():
            acc.fill(0.0)
        self._count = 0
        return moved

    def state_dict(self) -> dict[str, Any]:
        return {**self._model_state(), "buffer_sum": export_tensors(self._sum),
                "buffer_count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights, version = self._model_in(state, "buffer_sum", "buffer_count")
        buffer_sum = import_tensors(state, "buffer_sum", "FedBuff")
        check_same_layout(weights, buffer_sum, "FedBuff buffer")
        count = int(state["buffer_count"])
        if not 0 <= count < self.buffer_size:
            raise StrategyError(f"FedBuff state holds {count} buffered updates; buffer_size is "
                                f"{self.buffer_size} (restore with the same buffer_size)")
        self.init(weights, version)
        self._sum, self._count = buffer_sum, count
