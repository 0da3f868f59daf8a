"""Round observers: features that ride along a synchronous aggregator's rounds without the
round loop knowing them (a store's live ranking before each round, the sketch record a store
is fed after it). ``node.py`` attaches them; the aggregator only calls the four hooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from fedbus.bus import Bus
from strategies import ClientUpdate

__all__ = ["RoundObserver"]


class RoundObserver(Protocol):
    async def round_starting(self, number: int, bus: Bus) -> None:
        """Before round ``number`` selects (on the event loop; bound its own waits)."""
        ...

    def update_folded(self, number: int, update: ClientUpdate, meta: Mapping[str, Any],
                      norm: float, nbytes: int, arrival_s: float) -> None:
        """An update was folded (in the intake's worker thread, with the dense delta)."""
        ...

    async def round_closed(self, number: int, selected: list[str], aggregated: bool,
                           bus: Bus) -> None:
        """Round ``number`` is over, before its report (inside the round's time)."""
        ...

    def close(self) -> None:
        """The aggregator is done."""
        ...
