"""The sketch feed: a store that keeps no full updates gets each round's sketches from the
aggregator instead of a second copy of every update.

Why: a store fed the updates themselves (``update/<agg>/+``) makes the broker send it every
update once more (204 MB a round at 50 trainers x 1M params) and spends ~1.2 CPU-s a round
receiving, decoding and checking them, only to keep a 2,039-float sketch of each when its
policy keeps no full update (``store.full_update_rounds: 0``). The aggregator already holds
every accepted update, decoded and checked, in its intake thread: sketching it there, with the
store's own projection (``Sketcher(sketch_dim, seed)``), costs ~1 ms per million parameters,
and one record a round (``sketch/<agg>``) carries what the store would have derived.

Trust: the record comes from the aggregator itself (the topic's last level, tied to its
credentials by the ACL, like every other topic), so a trainer cannot fake its own sketch, and
it says which updates the aggregator actually accepted, in its own order. The store checks
the record like any other input (``read_record``): shapes, the projection's seed and size,
known trainers, example counts, finite numbers.

Record: an envelope of kind ``sketches`` for round r; ``meta.clients`` one entry per accepted
update in the aggregator's arrival order (sender, num_examples, metrics, duration_s,
arrival_s, staleness, base_round, bytes, norm), ``meta.dim``/``meta.seed`` the projection,
and one float32 tensor ``sketches`` of shape (clients, dim).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.errors import UpdateRejected
from fedbus.store.sketch import Sketcher
from strategies import ClientUpdate

__all__ = ["SKETCHES", "FeedSettings", "SketchFeed", "SketchPublisher", "read_record",
           "record_limits"]

#: Envelope kind of a round's sketch record (``sketch/<aggregator>``).
SKETCHES: Final = "sketches"
#: msgpack header room per client entry (sender, metrics, a few numbers).
_HEADER_PER_CLIENT: Final = 2048
#: Updates waiting for the sketch thread; beyond it the intake thread sketches itself (so
#: the deltas held for sketching stay bounded: this many updates).
MAX_PENDING: Final = 8
_MAX_METRICS: Final = 64


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """The store's projection, which the aggregator must use: ``store.sketch_dim`` (the
    sketcher takes the largest prime not above it) and the job's seed."""

    dim: int
    seed: int


class SketchFeed:
    """The aggregator's side. ``add`` runs in the intake's worker thread right after an update
    is folded and hands the sketching to a thread of its own, so the intake (and the upload
    slot it frees) does not wait for it; ``take`` collects the round's rows once the round is
    over. Why a thread of its own: numpy gives the GIL up and takes it back around every call,
    and while the event loop is busy receiving the next uploads each take-back can wait a
    switch interval (5 ms); a sketch is ~10 calls, so on the intake's path it cost the round
    ~4x its CPU time (measured: docs/benchmarks.md, "Metadata store").

    Memory: one sketch per accepted update of the open round (8 KB each at dim 2048), at most
    ``MAX_PENDING`` updates waiting to be sketched, and the sketcher's sign tables (4 bytes
    a parameter)."""

    def __init__(self, settings: FeedSettings) -> None:
        self.sketcher = Sketcher(settings.dim, settings.seed)
        self._round: int | None = None
        self._rows: list[tuple[dict[str, Any], Future[np.ndarray]]] = []
        self._round_cpu_s = 0.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sketch")
        #: CPU seconds spent sketching (the sketching threads' own time), in total.
        self.cpu_s = 0.0
        #: Sketches the intake thread made itself because the sketch thread was behind.
        self.inline = 0
        #: Sketches that raised (left out of their round's record).
        self.failed = 0

    def _sketch(self, delta: Mapping[str, np.ndarray]) -> np.ndarray:
        started = time.thread_time()
        sketch = self.sketcher.sketch(delta)
        spent = time.thread_time() - started
        with self._lock:
            self.cpu_s += spent
            self._round_cpu_s += spent
        return sketch

    def add(self, number: int, update: ClientUpdate, meta: Mapping[str, Any], norm: float,
            nbytes: int, arrival_s: float) -> None:
        duration = meta.get("duration_s")
        info: dict[str, Any] = {
            "sender": update.sender,
            "num_examples": update.num_examples,
            "metrics": dict(update.metrics),
            "duration_s": (float(duration) if isinstance(duration, (int, float))
                           and not isinstance(duration, bool) and math.isfinite(duration)
                           else None),
            "arrival_s": round(arrival_s, 4),
            "staleness": update.staleness,
            "base_round": update.base_round,
            "bytes": nbytes,
            "norm": norm,
        }
        with self._lock:
            if self._round != number:  # a new round: what is left of an old one is stale
                self._round, self._rows, self._round_cpu_s = number, [], 0.0
            behind = sum(not f.done() for _, f in self._rows) >= MAX_PENDING
        if behind:
            done: Future[np.ndarray] = Future()
            try:
                done.set_result(self._sketch(update.delta))
            except Exception as exc:  # counted at take(), like the sketch thread's
                done.set_exception(exc)
            self.inline += 1
        else:
            done = self._pool.submit(self._sketch, update.delta)
        with self._lock:
            if self._round == number:
                self._rows.append((info, done))

    def take(self, number: int) -> tuple[list[tuple[dict[str, Any], np.ndarray]], float]:
        """Round ``number``'s rows, in the order they were folded, and the CPU seconds their
        sketches took; waits for the sketches still being made (blocking: call it from a
        worker thread). The feed is empty after."""
        with self._lock:
            pending = self._rows if self._round == number else []
            self._round, self._rows = None, []
        rows = []
        for info, f in pending:
            try:
                rows.append((info, f.result()))
            except Exception:  # a sketch that failed must not fail the round
                self.failed += 1
        with self._lock:
            cpu, self._round_cpu_s = self._round_cpu_s, 0.0
        return rows, cpu

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def envelope(self, job: str, sender: str, number: int,
                 rows: list[tuple[dict[str, Any], np.ndarray]], **meta: Any) -> Envelope:
        tensors = {"sketches": np.stack([s for _, s in rows])} if rows else {}
        return Envelope(kind=SKETCHES, job=job, sender=sender, round=number,
                        meta={"dim": self.sketcher.dim, "seed": self.sketcher.seed,
                              "clients": [info for info, _ in rows], **meta},
                        tensors=tensors)


def record_limits(max_clients: int, dim: int, base: Limits) -> Limits:
    """Decode limits for one record: one (clients, dim) float32 tensor and a header of a few
    numbers per client, nothing bigger (refused before it is decompressed)."""
    data = max_clients * dim * 4
    header = (64 << 10) + _HEADER_PER_CLIENT * max_clients
    return Limits(max_frame_bytes=min(base.max_frame_bytes, data + data // 64 + header + 4096),
                  max_header_bytes=min(base.max_header_bytes, header),
                  max_decompressed_bytes=min(base.max_decompressed_bytes, data),
                  max_tensors=1, max_dims=2, allowed_dtypes=frozenset({"<f4"}))


def _finite(value: Any, what: str, lo: float = -math.inf) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < lo):
        raise UpdateRejected("bad_record", f"{what}={value!r:.40}")
    return float(value)


def read_record(env: Envelope, *, dim: int, seed: int, is_trainer: Callable[[str], bool],
                max_examples: int) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    """The checked rows of a record: (sender, fields, sketch) in the aggregator's order.
    Raises ``UpdateRejected`` (reason, detail) on anything that does not fit."""
    meta = env.meta
    if meta.get("dim") != dim or meta.get("seed") != seed:
        raise UpdateRejected("sketch_mismatch", f"dim={meta.get('dim')!r} seed="
                             f"{meta.get('seed')!r}, the store sketches with dim={dim} "
                             f"seed={seed} (store.sketch_dim and the job's seed)")
    clients = meta.get("clients")
    if not isinstance(clients, list):
        raise UpdateRejected("bad_record", "meta.clients is not a list")
    if set(env.tensors) - {"sketches"}:
        raise UpdateRejected("wrong_tensors", f"unexpected {sorted(env.tensors)[:5]}")
    sketches = env.tensors.get("sketches", np.zeros((0, dim), np.float32))
    if sketches.shape != (len(clients), dim) or sketches.dtype != np.float32:
        raise UpdateRejected("wrong_shape", f"sketches {sketches.shape} {sketches.dtype}, "
                                            f"expected ({len(clients)}, {dim}) float32")
    if not np.isfinite(sketches).all():
        raise UpdateRejected("non_finite", "a sketch holds NaN or Inf")
    rows: list[tuple[str, dict[str, Any], np.ndarray]] = []
    seen: set[str] = set()
    for i, c in enumerate(clients):
        if not isinstance(c, dict):
            raise UpdateRejected("bad_record", f"clients[{i}] is not a map")
        sender = c.get("sender")
        if not isinstance(sender, str) or not is_trainer(sender):
            raise UpdateRejected("unknown_sender", f"clients[{i}].sender={sender!r:.40} is not "
                                                   "a trainer of this aggregator")
        if sender in seen:
            raise UpdateRejected("duplicate", f"{sender} twice in one record")
        seen.add(sender)
        n = c.get("num_examples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= max_examples:
            raise UpdateRejected("bad_num_examples", f"{sender}: num_examples={n!r:.40}")
        metrics = c.get("metrics", {})
        fields: dict[str, Any] = {
            "num_examples": n,
            "metrics": ({k: float(v) for k, v in list(metrics.items())[:_MAX_METRICS]
                         if isinstance(k, str) and len(k) <= 64
                         and isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v)} if isinstance(metrics, dict) else {}),
            "duration_s": (None if c.get("duration_s") is None
                           else _finite(c.get("duration_s"), f"{sender}.duration_s", 0.0)),
            "arrival_s": _finite(c.get("arrival_s"), f"{sender}.arrival_s", 0.0),
            "staleness": int(_finite(c.get("staleness"), f"{sender}.staleness", 0.0)),
            "base_round": int(_finite(c.get("base_round"), f"{sender}.base_round", 0.0)),
            "bytes": int(_finite(c.get("bytes"), f"{sender}.bytes", 0.0)),
            "norm": _finite(c.get("norm"), f"{sender}.norm", 0.0),
        }
        rows.append((sender, fields, sketches[i]))
    return rows


class SketchPublisher:
    """A round observer of the aggregator that feeds a store sketches: every folded update
    is sketched beside the intake (``SketchFeed``), and once a round is over its record goes
    out in one message on ``sketch/<agg>``, inside the round's time (its cost is measured
    with the round)."""

    def __init__(self, settings: FeedSettings, job: str, node_id: str,
                 compression: Compression, epoch: str) -> None:
        self.feed = SketchFeed(settings)
        self.job, self.node_id = job, node_id
        self.compression = compression
        self.epoch = epoch
        self._log = structlog.get_logger(__name__).bind(node=node_id, job=job)

    async def round_starting(self, number: int, bus: Bus) -> None:
        return None

    def update_folded(self, number: int, update: ClientUpdate, meta: Mapping[str, Any],
                      norm: float, nbytes: int, arrival_s: float) -> None:
        self.feed.add(number, update, meta, norm, nbytes, arrival_s)

    async def round_closed(self, number: int, selected: list[str], aggregated: bool,
                           bus: Bus) -> None:
        started = time.monotonic()
        rows, cpu_s = await asyncio.to_thread(self.feed.take, number)
        env = self.feed.envelope(self.job, self.node_id, number, rows, selected=selected,
                                 aggregated=aggregated, sketch_cpu_s=round(cpu_s, 6),
                                 epoch=self.epoch)
        nbytes = sum(s.nbytes for _, s in rows)
        payload = (await asyncio.to_thread(encode, env, self.compression)
                   if nbytes >= 1 << 20 else encode(env, self.compression))
        await bus.publish(topics.sketch(self.job, self.node_id), payload)
        self._log.info("sketches_published", round=number, updates=len(rows),
                       bytes=len(payload), sketch_cpu_s=round(cpu_s, 4),
                       publish_s=round(time.monotonic() - started, 4),
                       sketched_inline=self.feed.inline, failed=self.feed.failed)

    def close(self) -> None:
        self.feed.close()
