"""Server-side rehearsal (FLUTE): after each aggregation, a training step on data the server
holds, applied to the new global model. Wrappers, so any synchronous strategy (``Rehearsal``)
or asynchronous one (``AsyncRehearsal``: after each model version) can have it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from strategies import AsyncStrategy, ClientUpdate, Strategy, StrategyError, Weights

__all__ = ["AsyncRehearsal", "Rehearsal"]

Rehearse = Callable[[Weights], Weights]


def _rehearsed(rehearse: Rehearse, weights: Weights) -> Weights:
    out = rehearse(weights)
    return {k: out[k].astype(v.dtype, copy=False) for k, v in weights.items()}


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
        return _rehearsed(self.rehearse, self.inner.finish())

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


class AsyncRehearsal(AsyncStrategy):
    """Runs ``inner`` unchanged; each model version it produces is passed through
    ``rehearse`` and becomes the global model the next updates apply to.

    The rehearsed weights go back into ``inner`` through its own state (``state_dict`` with
    the weights replaced, then ``load_state_dict``), so whatever else it keeps (FedBuff's
    buffer, a version count) stays as it was; a strategy whose state has no ``weights`` is
    refused.
    """

    def __init__(self, inner: AsyncStrategy, rehearse: Rehearse) -> None:
        if "weights" not in inner.state_dict():
            raise StrategyError(f"{inner.name}: server-side rehearsal needs a strategy whose "
                                "state_dict() holds the global model as 'weights'")
        self.inner = inner
        self.rehearse = rehearse
        self.name = f"rehearsal({inner.name})"  # type: ignore[misc]
        self.max_staleness = inner.max_staleness

    def client_config(self, version: int) -> dict[str, Any]:
        return self.inner.client_config(version)

    def init(self, weights: Weights, version: int = 0) -> None:
        self.inner.init(weights, version)

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def weights(self) -> Weights:
        return self.inner.weights

    def submit(self, update: ClientUpdate) -> Weights | None:
        moved = self.inner.submit(update)
        if moved is None:
            return None
        rehearsed = _rehearsed(self.rehearse, moved)
        state = self.inner.state_dict()
        state["weights"] = {k: v.copy() for k, v in rehearsed.items()}
        self.inner.load_state_dict(state)
        return rehearsed

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
