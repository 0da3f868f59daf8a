"""Server-side rehearsal (FLUTE): after each aggregation, a training step on data the server
holds, applied to the new global model. A wrapper, so any synchronous strategy can have it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from strategies import ClientUpdate, Strategy, Weights

__all__ = ["Rehearsal"]


class Rehearsal(Strategy):
    """Runs ``inner`` unchanged and passes what ``finish`` returns through ``rehearse``."""

    def __init__(self, inner: Strategy, rehearse: Callable[[Weights], Weights]) -> None:
        self.inner = inner
        self.rehearse = rehearse
        self.name = f"rehearsal({inner.name})"  # type: ignore[misc]
        self.needs_all_updates = inner.needs_all_updates  # type: ignore[misc]

    @property
    def num_accumulated(self) -> int:
        return self.inner.num_accumulated

    def client_config(self, round: int) -> dict[str, Any]:
        return self.inner.client_config(round)

    def client_tensors(self, round: int) -> Weights:
        return self.inner.client_tensors(round)

    def begin(self, weights: Weights, round: int) -> None:
        self.inner.begin(weights, round)

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(update)

    def finish(self) -> Weights:
        aggregated = self.inner.finish()
        rehearsed = self.rehearse(aggregated)
        return {k: rehearsed[k].astype(v.dtype, copy=False) for k, v in aggregated.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
