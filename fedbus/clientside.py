"""What every client does to its delta before it leaves: client-side DP when the
aggregator's round config asks for it, then update compression (``codec.update``).

One chain for the trainer and the simulation worker alike, so a simulated client sends
exactly what a deployed one would. Every random draw is seeded per (job seed, client,
round), never from a stream that depends on which process or worker ran the client: the
same manifest gives the same model as a simulation and as a deployment.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from fedbus.compress import UpdateCodec, UpdateCompressor
from fedbus.errors import FedbusError
from strategies import StrategyError
from strategies.dp import clip_and_noise

__all__ = ["RESIDUAL_PREFIX", "ClientSide", "Prepared"]

#: A simulated client's top-k residual (error feedback) is saved beside its task state under
#: these names: ``codec.residual.<tensor>``.
RESIDUAL_PREFIX: Final = "codec.residual."
# Distinct streams for the two draws of one (client, round).
_DP_STREAM: Final = 0
_CODEC_STREAM: Final = 1


@dataclass(frozen=True, slots=True)
class Prepared:
    """An update ready to encode: the tensors to send, the meta entries that describe them
    (``update_codec``), and the client's metrics (DP adds its own); ``delta`` is the dense
    delta after DP, before compression (what a ring group sums)."""

    delta: Mapping[str, np.ndarray]
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    metrics: dict[str, float]


def _rng(config: Mapping[str, Any], client: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(config.get("seed", 0)), zlib.crc32(client.encode()),
                                  int(config.get("round", 0)), stream])


class ClientSide:
    """The chain for one client, or for many clients one after another (a simulation worker
    passes each client's saved residual in and takes it back out)."""

    def __init__(self, codec: UpdateCodec) -> None:
        self.codec = codec
        self._compressor = UpdateCompressor(codec)

    def prepare(self, delta: Mapping[str, np.ndarray], metrics: Mapping[str, float],
                config: Mapping[str, Any], client: str) -> Prepared:
        """``delta`` as it leaves ``client`` for the round ``config`` describes. Raises
        ``FedbusError`` on DP settings that make no sense (the aggregator's, not ours)."""
        out_metrics = {k: float(v) for k, v in metrics.items()}
        if "dp_clipping_norm" in config:
            delta, report = self._dp(delta, config, client)
            out_metrics["dp_clipped"] = float(report["clipped"])
            out_metrics["dp_noise_multiplier"] = float(report["noise_multiplier"])
        tensors, meta = self._compressor.encode(delta, rng=_rng(config, client, _CODEC_STREAM))
        return Prepared(delta, tensors, meta, out_metrics)

    @staticmethod
    def _dp(delta: Mapping[str, np.ndarray], config: Mapping[str, Any], client: str
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Client-side DP (strategy ``dp_client``): clip and noise before anything leaves."""
        try:
            clip = float(config["dp_clipping_norm"])
            noise = float(config.get("dp_noise_multiplier", 0.0))
            return clip_and_noise(delta, clip, noise, _rng(config, client, _DP_STREAM))
        except (StrategyError, TypeError, ValueError) as exc:
            raise FedbusError(f"bad client-side DP settings from the aggregator: {exc}") from exc

    # -- a client's state between rounds (top-k's residual) ---------------------------------

    @property
    def stateful(self) -> bool:
        return self.codec.mode == "topk"

    def state(self) -> dict[str, np.ndarray]:
        """What this chain keeps for the client between rounds, as named arrays."""
        return {RESIDUAL_PREFIX + k: v for k, v in self._compressor.residual.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Switch to another client's saved state (names from ``state()``; others ignored)."""
        n = len(RESIDUAL_PREFIX)
        self._compressor.residual = {k[n:]: np.asarray(v) for k, v in state.items()
                                     if k.startswith(RESIDUAL_PREFIX)}


def split_state(state: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A saved client state as (the task's arrays, the chain's arrays)."""
    task = {k: v for k, v in state.items() if not k.startswith(RESIDUAL_PREFIX)}
    chain = {k: v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
    return task, chain
