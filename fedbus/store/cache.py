"""Caches in front of the on-disk store: a process-local LRU bounded by bytes, and Redis as an
optional cache shared by several store processes.

The LRU holds decoded arrays (a hit costs nothing to decode); Redis holds codec frames, the
same bytes as the files on disk, so whatever it serves goes through ``fedbus.codec.decode``
with limits like anything read from the wire.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import structlog

from fedbus.errors import FedbusError

__all__ = ["ByteLRU", "RedisCache", "StoreError"]

log = structlog.get_logger(__name__)


class StoreError(FedbusError):
    """The metadata store could not read, write or answer; the message says where and why."""


class ByteLRU:
    """Least-recently-used cache of arrays whose total ``nbytes`` never exceeds ``capacity``.

    Thread-safe: the store writes from worker threads and workloads read from others. An
    array larger than the whole capacity is not cached at all.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        size = int(value.nbytes)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= int(old.nbytes)
            if size > self.capacity:
                return
            # Read-only so a cached array can be handed to many readers without copies.
            if value.flags.writeable:
                value = value.view()
                value.flags.writeable = False
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= int(evicted.nbytes)
                self.evictions += 1

    def discard_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k.startswith(prefix)]:
                self.bytes -= int(self._items.pop(key).nbytes)

    def stats(self) -> dict[str, int]:
        return {"bytes": self.bytes, "capacity": self.capacity, "items": len(self._items),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class RedisCache:
    """Codec frames in Redis under ``<prefix><key>``, expiring after ``ttl_s`` (0: never).

    Redis's own ``maxmemory`` policy bounds it; large model blobs belong on disk (FACTS.md:
    AOF double-writes them), so this is a cache, never the store of record.
    """

    def __init__(self, url: str, prefix: str, *, ttl_s: int = 3600) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # the optional 'redis' extra
            raise StoreError(f"store.redis_url is set but redis-py is missing ({exc}); "
                             "install fedbus[redis]") from None
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._client: Any = aioredis.from_url(url)
        self.hits = 0
        self.misses = 0
        self.errors = 0

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._client.get(self.prefix + key)
        except Exception as exc:  # a cache must never take the store down
            self.errors += 1
            log.warning("redis_get_failed", url=self.url, error=repr(exc))
            return None
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return bytes(value)

    async def put(self, key: str, frame: bytes) -> None:
        try:
            await self._client.set(self.prefix + key, frame, ex=self.ttl_s or None)
        except Exception as exc:
            self.errors += 1
            log.warning("redis_put_failed", url=self.url, error=repr(exc))

    async def delete_prefix(self, prefix: str) -> None:
        try:
            keys = [k async for k in self._client.scan_iter(match=self.prefix + prefix + "*")]
            if keys:
                await self._client.delete(*keys)
        except Exception as exc:
            self.errors += 1
            log.warning("redis_delete_failed", url=self.url, error=repr(exc))

    async def close(self) -> None:
        await self._client.aclose()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "errors": self.errors}
