"""The store's read/write API: disk as the store of record, a byte-bounded LRU in front, and
optionally Redis between them (shared by several store processes).

Writes are synchronous (the service runs them in a worker thread, off the event loop and far
from the aggregator); reads are async because a Redis lookup is. Round records are small and
kept in memory; tensors (models, updates, sketches) go through the caches.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fedbus.codec import Limits
from fedbus.manifest import Manifest, NodeSpec
from fedbus.store.cache import ByteLRU, RedisCache
from fedbus.store.disk import DiskStore, model_key, sketch_key, update_key

__all__ = ["Retention", "RoundStore", "open_round_store", "store_dir"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history stays (0: everything)."""

    full_update_rounds: int = 3
    model_rounds: int = 0
    keep_rounds: int = 0


class RoundStore:
    def __init__(self, root: str | os.PathLike[str], job: str, *, cache_bytes: int,
                 limits: Limits | None = None, retention: Retention | None = None,
                 redis: RedisCache | None = None, fsync: bool = True) -> None:
        self.disk = DiskStore(root, job, limits or Limits(), fsync=fsync)
        self.cache = ByteLRU(cache_bytes)
        self.redis = redis
        self.retention = retention or Retention()
        self.records: dict[int, dict[str, Any]] = {}
        for r in self.disk.rounds():
            rec = self.disk.read_record(r)
            if rec is not None:
                self.records[r] = rec

    # --- writes (worker thread) -----------------------------------------------------------
    def write_model(self, r: int, weights: Mapping[str, np.ndarray]) -> dict[str, bytes]:
        frames = self.disk.write_layers(r, None, weights)
        for name, arr in weights.items():
            self.cache.put(model_key(r, name), arr)
        return frames

    def write_update(self, r: int, client: str, delta: Mapping[str, np.ndarray],
                     ) -> dict[str, bytes]:
        frames = self.disk.write_layers(r, client, delta)
        for name, arr in delta.items():
            self.cache.put(update_key(r, client, name), arr)
        return frames

    def write_sketch(self, r: int, client: str, sketch: np.ndarray,
                     meta: Mapping[str, Any]) -> dict[str, bytes]:
        key, frame = self.disk.write_sketch(r, client, sketch, meta)
        self.cache.put(key, sketch)
        return {key: frame}

    def write_record(self, r: int, record: dict[str, Any]) -> None:
        self.disk.write_record(r, record)
        self.records[r] = record

    def apply_retention(self, latest: int) -> list[str]:
        """Drop what the retention policy no longer keeps; returns the cache prefixes gone."""
        gone: list[str] = []
        ret = self.retention
        for r in self.disk.rounds():
            if ret.keep_rounds and r <= latest - ret.keep_rounds:
                gone.append(self.disk.delete(r, "all"))
                self.records.pop(r, None)
                continue
            if r <= latest - ret.full_update_rounds and self._has_any_update(r):
                gone.append(self.disk.delete(r, "updates"))
                rec = self.records.get(r)
                if rec is not None:
                    for c in rec.get("clients", {}).values():
                        c["full"] = False
                    self.disk.write_record(r, rec)
            if ret.model_rounds and r <= latest - ret.model_rounds and self.disk.layers(r, None):
                gone.append(self.disk.delete(r, "model"))
        for prefix in gone:
            self.cache.discard_prefix(prefix)
        return gone

    def _has_any_update(self, r: int) -> bool:
        rec = self.records.get(r, {})
        return any(c.get("full") for c in rec.get("clients", {}).values())

    # --- reads (async: Redis) -------------------------------------------------------------
    async def _tensor(self, key: str, sketch: bool = False) -> np.ndarray | None:
        arr = self.cache.get(key)
        if arr is not None:
            return arr
        frame = await self.redis.get(key) if self.redis is not None else None
        from_redis = frame is not None
        if frame is None:
            frame = await asyncio.to_thread(self.disk.read_frame, key)
        if frame is None:
            return None
        arr = (self.disk.sketch_of(key, frame) if sketch else self.disk.tensor_of(key, frame))
        self.cache.put(key, arr)
        if self.redis is not None and not from_redis:
            await self.redis.put(key, frame)
        return arr

    async def _tensors(self, r: int, client: str | None,
                       layers: Sequence[str] | None) -> dict[str, np.ndarray] | None:
        names = list(layers) if layers is not None else self.layer_names(r, client)
        if not names:
            return None
        out: dict[str, np.ndarray] = {}
        for name in names:
            key = model_key(r, name) if client is None else update_key(r, client, name)
            arr = await self._tensor(key)
            if arr is None:
                return None
            out[name] = arr
        return out

    def layer_names(self, r: int, client: str | None) -> list[str]:
        rec = self.records.get(r, {})
        names = rec.get("layers")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        return self.disk.layers(r, client)

    async def model(self, r: int, layers: Sequence[str] | None = None,
                    ) -> dict[str, np.ndarray] | None:
        """The global model round ``r`` started from (``layers``: only those)."""
        return await self._tensors(r, None, layers)

    async def update(self, r: int, client: str, layers: Sequence[str] | None = None,
                     ) -> dict[str, np.ndarray] | None:
        """``client``'s full update of round ``r``, or None where retention dropped it."""
        rec = self.records.get(r, {})
        info = rec.get("clients", {}).get(client)
        if info is not None and not info.get("full"):
            return None
        return await self._tensors(r, client, layers)

    async def sketch(self, r: int, client: str) -> np.ndarray | None:
        return await self._tensor(sketch_key(r, client), sketch=True)

    async def share(self, frames: Mapping[str, bytes]) -> None:
        """Write-through to Redis, so other store processes find what this one wrote."""
        if self.redis is not None:
            for key, frame in frames.items():
                await self.redis.put(key, frame)

    def rounds(self) -> list[int]:
        return sorted(self.records)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache": self.cache.stats(), "rounds": len(self.records),
                               "bytes_written": self.disk.bytes_written}
        if self.redis is not None:
            out["redis"] = self.redis.stats()
        return out


def store_dir(m: Manifest, node: NodeSpec) -> Path:
    """Where ``node`` keeps its rounds: ``store.dir``, or ``fedbus-store/<job>/<node>``."""
    return Path(m.store.dir) if m.store.dir else Path.cwd() / "fedbus-store" / m.job / node.id


def open_round_store(m: Manifest, node: NodeSpec, *, limits: Limits | None = None,
                     redis: RedisCache | None = None) -> RoundStore:
    """The store ``node`` of ``m`` keeps, with the manifest's cache and retention: the one
    way the running store service and an offline query open it."""
    spec = m.store
    return RoundStore(store_dir(m, node), m.job, cache_bytes=spec.cache_mb << 20,
                      limits=limits, redis=redis,
                      retention=Retention(spec.full_update_rounds, spec.model_rounds,
                                          spec.keep_rounds))
