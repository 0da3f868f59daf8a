"""Where checkpoint frames are kept: disk (the embedded default), Redis, or both.

A stored checkpoint is ``b"FCK1" | crc32 | length | frame``: the codec frame of the state,
checked on load, so a truncated or corrupted file is detected, skipped with a log line naming
it, and the previous good one is used. Disk writes are atomic (temporary file, fsync, rename,
fsync of the folder) and keep the last ``keep`` rounds per aggregator. Redis keeps the same
records (``fedbus:<job>:<node>:<round>`` plus a sorted index); with ``TieredStore`` every
checkpoint goes to both and a Redis that lost its data (restart without AOF, flush) is backed
up by the newest good file on disk, as Flotilla does, without its pickles.

Everything here is blocking I/O: the checkpointer calls it in a worker thread.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Final

import structlog

from fedbus.errors import FedbusError

__all__ = ["CheckpointStore", "DiskStore", "RedisStore", "TieredStore", "pack", "unpack"]

log = structlog.get_logger(__name__)

_MAGIC: Final = b"FCK1"
_HEAD: Final = struct.Struct("<4sIQ")
_NAME = re.compile(r"^round-(\d{9})\.ckpt$")


class CheckpointError(FedbusError):
    """A stored checkpoint is damaged (bad magic, length or checksum)."""


def pack(frame: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, zlib.crc32(frame), len(frame)) + frame


def unpack(record: bytes) -> bytes:
    if len(record) < _HEAD.size:
        raise CheckpointError(f"truncated: {len(record)} bytes, shorter than the header")
    magic, crc, length = _HEAD.unpack_from(record)
    frame = record[_HEAD.size:]
    if magic != _MAGIC:
        raise CheckpointError("not a fedbus checkpoint (bad magic)")
    if len(frame) != length:
        raise CheckpointError(f"truncated: {len(frame)} of {length} bytes")
    if zlib.crc32(frame) != crc:
        raise CheckpointError("checksum mismatch (corrupted)")
    return frame


class CheckpointStore(ABC):
    """Keeps checkpoint frames per (job, aggregator node), newest round wins."""

    @abstractmethod
    def save(self, job: str, node: str, round: int, frame: bytes) -> None: ...

    @abstractmethod
    def latest(self, job: str, node: str) -> tuple[int, bytes] | None:
        """(round, frame) of the newest good checkpoint, or None."""

    def close(self) -> None:
        """Release connections (Redis)."""


class DiskStore(CheckpointStore):
    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def _dir(self, job: str, node: str) -> Path:
        return self.root / job / node

    def save(self, job: str, node: str, round: int, frame: bytes) -> None:
        folder = self._dir(job, node)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"round-{round:09d}.ckpt"
        tmp = folder / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(pack(frame))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        # the rename itself must survive a power cut: sync the folder's entry too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self._rounds(folder)[: -self.keep]:
            (folder / f"round-{old:09d}.ckpt").unlink(missing_ok=True)

    def _rounds(self, folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, job: str, node: str) -> tuple[int, bytes] | None:
        folder = self._dir(job, node)
        for round in reversed(self._rounds(folder)):
            path = folder / f"round-{round:09d}.ckpt"
            try:
                return round, unpack(path.read_bytes())
            except (OSError, CheckpointError) as exc:
                log.error("skip_checkpoint", path=str(path), error=str(exc),
                          detail="damaged; trying the previous one")
        return None


class RedisStore(CheckpointStore):
    """Checkpoints in Redis (redis-py, synchronous: the checkpointer runs it in a thread)."""

    def __init__(self, url: str, keep: int = 3, *, client: Any = None) -> None:
        if client is None:
            import redis  # the 'redis' extra: only where a Redis store is configured

            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.redis = client
        self.keep = keep

    @staticmethod
    def _keys(job: str, node: str) -> tuple[str, str]:
        base = f"fedbus:{job}:{node}"
        return base, f"{base}:rounds"

    def save(self, job: str, node: str, round: int, frame: bytes) -> None:
        base, index = self._keys(job, node)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"{base}:{round}", pack(frame))
        pipe.zadd(index, {str(round): round})
        pipe.execute()
        stale = self.redis.zrange(index, 0, -self.keep - 1)
        if stale:
            self.redis.delete(*(f"{base}:{r.decode()}" for r in stale))
            self.redis.zrem(index, *stale)

    def latest(self, job: str, node: str) -> tuple[int, bytes] | None:
        base, index = self._keys(job, node)
        for raw in self.redis.zrevrange(index, 0, -1):
            round = int(raw)
            record = self.redis.get(f"{base}:{round}")
            if record is None:
                continue
            try:
                return round, unpack(record)
            except CheckpointError as exc:
                log.error("skip_checkpoint", store="redis", key=f"{base}:{round}",
                          error=str(exc), detail="damaged; trying the previous one")
        return None

    def close(self) -> None:
        self.redis.close()


class TieredStore(CheckpointStore):
    """Redis first, disk as its back-up: saves go to both; loads take the newer good one
    (Redis restarted empty, flushed or behind: the disk copy wins)."""

    def __init__(self, fast: CheckpointStore, durable: CheckpointStore) -> None:
        self.fast = fast
        self.durable = durable

    def save(self, job: str, node: str, round: int, frame: bytes) -> None:
        self.durable.save(job, node, round, frame)
        try:
            self.fast.save(job, node, round, frame)
        except Exception as exc:  # Redis down: disk has it; say so and go on
            log.warning("checkpoint_redis_failed", job=job, node=node, round=round,
                        error=repr(exc))

    def latest(self, job: str, node: str) -> tuple[int, bytes] | None:
        try:
            fast = self.fast.latest(job, node)
        except Exception as exc:
            log.warning("checkpoint_redis_failed", job=job, node=node, error=repr(exc))
            fast = None
        durable = self.durable.latest(job, node)
        if fast is None or (durable is not None and durable[0] > fast[0]):
            if durable is not None:
                log.info("checkpoint_from_disk", job=job, node=node, round=durable[0],
                         redis_round=fast[0] if fast else None)
            return durable
        return fast

    def close(self) -> None:
        self.fast.close()
        self.durable.close()
