"""A simulated population: client ids and per-client heterogeneity, drawn on demand.

Nothing is stored per client. Every draw comes from a numpy generator seeded by (job seed,
what is drawn, client index[, round]), so it is the same whichever worker or process asks,
and a run with the same seed replays exactly.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from fedbus.errors import FedbusError
from fedbus.manifest import PopulationSpec

__all__ = ["Population"]

# Stream tags: one independent generator per kind of draw.
_SPEED: Final = 0x5EED
_DROP: Final = 0xD20F
_STALE: Final = 0x57A1


class Population:
    """Ids, speeds, availability, dropouts and stale delays of ``spec.clients`` clients."""

    def __init__(self, spec: PopulationSpec, seed: int) -> None:
        self.spec = spec
        self.seed = int(seed)
        self._keep = spec.availability * (1.0 - spec.dropout)

    def __len__(self) -> int:
        return self.spec.clients

    def client_id(self, index: int) -> str:
        return f"{self.spec.prefix}{index}"

    def index(self, client: str) -> int:
        """The client's index (its data partition) from its id."""
        prefix = self.spec.prefix
        tail = client[len(prefix):] if client.startswith(prefix) else ""
        if not tail.isdigit() or int(tail) >= self.spec.clients:
            raise FedbusError(f"{client!r} is not a client of this population "
                              f"({prefix}0..{prefix}{self.spec.clients - 1})")
        return int(tail)

    def is_client(self, name: str) -> bool:
        """Whether ``name`` is one of this population's client ids (no exception)."""
        prefix = self.spec.prefix
        tail = name[len(prefix):] if name.startswith(prefix) else ""
        return tail.isdigit() and int(tail) < self.spec.clients and str(int(tail)) == tail

    def speed(self, index: int) -> float:
        """Relative speed (1.0 = nominal), lognormal(0, speed_sigma), fixed per client."""
        if self.spec.speed_sigma == 0:
            return 1.0
        rng = np.random.default_rng([self.seed, _SPEED, index])
        return float(rng.lognormal(0.0, self.spec.speed_sigma))

    def drops_out(self, index: int, work: int) -> bool:
        """Whether the client fails work item ``work`` (a round, or an async dispatch):
        unavailable (1 - availability) or dropping out while training (dropout)."""
        if self._keep >= 1.0:
            return False
        rng = np.random.default_rng([self.seed, _DROP, index, work])
        return bool(rng.random() >= self._keep)

    def duration(self, index: int, work: int) -> float:
        """Virtual seconds the client takes for work item ``work``: 1/speed, plus
        ``stale_delay`` with probability ``stale_prob`` (an update that lands late)."""
        d = 1.0 / self.speed(index)
        if self.spec.stale_prob > 0:
            rng = np.random.default_rng([self.seed, _STALE, index, work])
            if rng.random() < self.spec.stale_prob:
                d += self.spec.stale_delay
        if not math.isfinite(d):
            raise FedbusError(f"client {index}: duration {d} is not finite")
        return d

    def stale_rounds(self, index: int, round: int) -> int:
        """Synchronous rounds: how many rounds old the model is that the client's update for
        ``round`` was trained from (0: fresh). With probability ``stale_prob`` it is
        ``ceil(stale_delay)`` (at least 1): FLUTE's stale update, landing rounds late."""
        if self.spec.stale_prob <= 0:
            return 0
        rng = np.random.default_rng([self.seed, _STALE, index, round, 1])
        if rng.random() >= self.spec.stale_prob:
            return 0
        return max(1, math.ceil(self.spec.stale_delay))
