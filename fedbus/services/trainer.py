"""The trainer: wait for round orders, train the task in a worker thread, send back a delta.

Training never runs on the event loop, so MQTT keepalives (our heartbeat) keep flowing while
a slow Raspberry Pi trains. The same class serves every topology: it only knows its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus
from fedbus.codec import Compression, Envelope, Limits, decode, encode
from fedbus.errors import CodecError, FedbusError, UpdateRejected
from fedbus.services._wire import (
    DONE,
    GRANT,
    READY,
    ROUND,
    UPDATE,
    Rejections,
    SeenIds,
    join_tensors,
    presence,
    split_tensors,
)
from fedbus.task import FitResult, Task
from strategies import StrategyError
from strategies.dp import clip_and_noise

__all__ = ["Trainer", "TrainerConfig"]

log = structlog.get_logger(__name__)

#: A hook applied to (delta, config) before sending, e.g. client-side DP clipping + noise.
DeltaHook = Callable[[dict[str, np.ndarray], Mapping[str, Any]], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    job: str
    node_id: str
    parent: str
    compression: Compression = Compression()
    limits: Limits = Limits()


class Trainer:
    """Serves round orders from ``config.parent`` until it says the job is done."""

    def __init__(
        self,
        config: TrainerConfig,
        bus: Bus,
        task: Task,
        *,
        delta_hook: DeltaHook | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.task = task
        self.delta_hook = delta_hook
        self.rounds_trained = 0
        self.rejections = Rejections(config.node_id)
        self._last_round = -1
        self._orders_seen = SeenIds(capacity=4096)
        #: A large update waiting for the aggregator's upload grant: (round, payload).
        self._pending: tuple[int, bytes] | None = None
        self._log = log.bind(node=config.node_id, role="trainer", job=config.job)

    async def run(self) -> int:
        """Returns the number of rounds this trainer took part in."""
        c = self.config
        filters = (topics.model(c.job, c.parent), topics.control(c.job, c.node_id))
        async with self.bus.subscribe(*filters) as sub:
            await self._publish_presence("online")
            try:
                async for msg in sub:
                    try:
                        env = decode(msg.payload, c.limits)
                    except CodecError as exc:
                        self.rejections.reject(exc.reason, exc.detail, topic=msg.topic)
                        continue
                    if env.sender != c.parent or env.job != c.job:
                        self.rejections.reject("wrong_sender", f"{env.sender}/{env.job}")
                        continue
                    if env.kind == DONE:
                        self._log.info("job_done", rounds_trained=self.rounds_trained)
                        break
                    if env.kind == ROUND:
                        await self._on_round(env)
                    elif env.kind == GRANT:
                        await self._on_grant(env)
            finally:
                # Best effort: if the connection is gone, the broker's last will says it.
                with contextlib.suppress(FedbusError):
                    await self._publish_presence("offline")
        return self.rounds_trained

    async def _on_round(self, env: Envelope) -> None:
        c = self.config
        selected = env.meta.get("selected", [])
        if not isinstance(selected, list) or c.node_id not in selected:
            return
        if env.meta.get("mode") == "async":
            # Async work names a model version that may legitimately come again; only a
            # redelivery of the same order (same message id) is a duplicate.
            if not self._orders_seen.add(env.msg_id):
                return
        elif env.round <= self._last_round:
            return  # a re-broadcast (round extension) of a round we already delivered
        config = env.meta.get("config", {})
        if not isinstance(config, dict):
            self.rejections.reject("bad_config", f"config is {type(config).__name__}")
            return
        try:
            weights, extra = split_tensors(env.tensors)
        except UpdateRejected as exc:
            self.rejections.reject(exc.reason, exc.detail)
            return
        if self._pending is not None:
            self._log.warning("upload_abandoned", round=self._pending[0], new_round=env.round)
            self._pending = None
        started = time.monotonic()
        try:
            delta, result = await asyncio.to_thread(self._train, weights, extra, config)
        except FedbusError as exc:
            self._log.error("training_failed", round=env.round, error=str(exc))
            return
        except Exception as exc:  # the user's code: report, stay alive for the next round
            self._log.exception("task_raised", round=env.round, error=repr(exc))
            return
        duration = time.monotonic() - started
        update = Envelope(
            kind=UPDATE,
            job=c.job,
            sender=c.node_id,
            round=env.round,
            meta={
                "num_examples": int(result.num_examples),
                "metrics": {k: float(v) for k, v in result.metrics.items()},
                "duration_s": round(duration, 4),
            },
            tensors=join_tensors(delta, result.aux),
        )
        payload = await asyncio.to_thread(encode, update, c.compression)
        del update, delta, weights  # the payload is all that is needed now
        self._last_round = env.round
        self.rounds_trained += 1
        gate = env.meta.get("upload_gate_bytes")
        if isinstance(gate, int) and not isinstance(gate, bool) and len(payload) > gate:
            # Large: announce it and upload when the aggregator grants a slot (UploadGate).
            self._pending = (env.round, payload)
            ready = Envelope(kind=READY, job=c.job, sender=c.node_id, round=env.round,
                             meta={"bytes": len(payload)})
            await self.bus.publish(topics.update(c.job, c.parent, c.node_id), encode(ready))
            self._log.info("update_ready", round=env.round, seconds=round(duration, 3),
                           bytes=len(payload))
            return
        await self.bus.publish(topics.update(c.job, c.parent, c.node_id), payload)
        self._log.info("update_sent", round=env.round, examples=result.num_examples,
                       seconds=round(duration, 3), bytes=len(payload))

    async def _on_grant(self, env: Envelope) -> None:
        if self._pending is None or self._pending[0] != env.round:
            self._log.debug("grant_ignored", round=env.round)
            return
        _, payload = self._pending
        self._pending = None
        await self.bus.publish(topics.update(self.config.job, self.config.parent,
                                             self.config.node_id), payload)
        self._log.info("update_sent", round=env.round, bytes=len(payload), granted=True)

    def _train(
        self, weights: dict[str, np.ndarray], extra: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> tuple[dict[str, np.ndarray], FitResult]:
        try:
            self.task.set_weights(weights)
        except Exception as exc:
            raise FedbusError(f"global model does not fit this task: {exc}") from exc
        result = self.task.fit(config, extra)
        if result.num_examples <= 0:
            raise FedbusError("task trained on 0 examples: nothing to send")
        local = self.task.get_weights()
        delta = {k: (local[k] - weights[k]).astype(weights[k].dtype, copy=False) for k in weights}
        if "dp_clipping_norm" in config:
            delta, result = self._local_dp(delta, result, config)
        if self.delta_hook is not None:
            delta = self.delta_hook(delta, config)
        return delta, result

    def _local_dp(
        self, delta: dict[str, np.ndarray], result: FitResult, config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], FitResult]:
        """Client-side DP (strategy ``dp_client``): clip and noise before anything leaves."""
        try:
            clip = float(config["dp_clipping_norm"])
            noise = float(config.get("dp_noise_multiplier", 0.0))
            # Seeded per (job seed, node, round): reproducible, and different for every node.
            node_key = zlib.crc32(self.config.node_id.encode())
            rng = np.random.default_rng([int(config.get("seed", 0)), node_key,
                                         int(config.get("round", 0))])
            noised, report = clip_and_noise(delta, clip, noise, rng)
        except (StrategyError, TypeError, ValueError) as exc:
            raise FedbusError(f"bad client-side DP settings from the aggregator: {exc}") from exc
        metrics = {**result.metrics, "dp_clipped": float(report["clipped"]),
                   "dp_noise_multiplier": float(report["noise_multiplier"])}
        return noised, FitResult(result.num_examples, metrics, result.aux)

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "trainer", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)
