"""Transparent chunking: split big payloads into integrity-checked frames, reassemble them bounded.

Shared by every bus, so the memory bus and the MQTT bus chunk (and fail) the same way.

Frame layout (big-endian, 44-byte header, then the chunk's bytes)::

    magic  b"FK"       2   distinct from the codec's b"FB" frames
    version            1   FRAME_VERSION (3; 1 carried a BLAKE2b digest, 2 had no flags)
    flags              1   bit 0 SIGNED (below); the others 0
    transfer id       16   random per payload (os.urandom)
    index              4   0-based chunk index
    count              4   number of chunks in the transfer (>= 1)
    total              8   length of the whole payload in bytes
    chunk crc32        4   zlib.crc32 of this chunk's bytes (SIGNED: 0)
    payload crc32      4   zlib.crc32 of the whole payload (SIGNED: the trailer's length)

Integrity is checked at the depth where faults happen, at crc32's speed (TCP already checksums
the link, the codec validates its own header and sizes): each chunk's crc32 catches a damaged
chunk; the whole payload's crc32 binds every chunk to its place (a chunk under the wrong index,
or from another payload with a valid crc of its own, fails it). The sender reads the payload
once: it computes the per-chunk crcs and combines them into the whole crc (``crc32_combine``,
arithmetic on 32-bit numbers, no second pass over the bytes). A receiver never hashes the
joined payload: it already checked every chunk's crc, so it combines the chunk crcs it accepted,
in index order, and compares with the declared whole crc. Version 1 hashed every payload with
BLAKE2b on the sender and again on every receiver (a quarter of the aggregator's CPU).

A SIGNED transfer is a payload followed by its signature trailer (``fedbus.signing``; the
bus above, ``fedbus.bus.signed``, passes it as ``tail``). Its chunks carry no crc32 at all:
the signature's BLAKE3 pass reads every byte and binds every chunk to its place, which is
what the crcs are for, so a signed payload is read once on each side, not twice (a crc32 of
44 MB costs as much as its BLAKE3 here, ~20 ms). The trailer is framed after the payload
without copying the payload, and the receiver splits it off again while joining the chunks
(``Tailed``), so neither side copies a signed payload to add or remove 100 bytes. A receiver
hashes a signed payload as its chunks arrive (BLAKE3, ``fedbus.signing``), each while it is
still in cache, as it did the crc32s (a chunk that comes early waits for the gap to fill):
the signature check above is then one Ed25519 verification, made at once on arrival, with
no second pass over the bytes and no trip to a worker thread.

Every chunk is published on the same topic as the whole payload would have been. A payload
small enough to travel whole is sent untouched, except one that itself starts with the chunk
magic: it is wrapped as a one-chunk transfer, so that on receipt "starts with b'FK'" always
means "is a chunk frame" and passthrough is unambiguous.

Reassembly is keyed by (route, topic, transfer id), accepts chunks in any order, ignores
duplicates and is bounded: at most ``max_partial_transfers`` incomplete transfers, at most
``max_partials_per_topic`` of them on one topic (one topic = one sender in fedbus, so a sender
that opens another transfer evicts its own oldest, never someone else's), at most
``max_buffered_bytes`` held in them, no payload above ``max_message_bytes``, and a partial
transfer older than ``transfer_timeout_s`` is dropped and counted. A subscriber may also vet a
new transfer before anything is buffered (``admit``: who may send it, and how big). A bad
chunk is dropped, logged and counted by reason; it never raises into the bus.

A lost chunk is repaired, not fatal: ``stalled()`` names the missing chunks of a transfer
that made no progress for ``nack_after_s``, and the bus's ``Repair`` (``fedbus.bus._repair``)
asks the topic's owner to resend just those (at most ``max_nacks`` times); a transfer that
still misses a chunk expires and is counted (``transfers_expired``) as before.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import structlog

from fedbus.errors import BusError, FedbusError
from fedbus.log import worth_a_line

__all__ = [
    "CHUNK_MAGIC",
    "FRAME_VERSION",
    "HEADER",
    "ChunkLimits",
    "Reassembler",
    "Tailed",
    "Transfer",
    "crc32_combine",
    "frames",
    "is_chunk_frame",
    "plan",
]

log = structlog.get_logger(__name__)

CHUNK_MAGIC: Final = b"FK"
FRAME_VERSION: Final = 3
HEADER: Final = struct.Struct("!2sBB16sIIQII")
SIGNED: Final = 0x01  # flags: the payload ends with a signature trailer; no crc32s
#: A signature trailer is 64 + an id of at most 64 + 5 bytes; a SIGNED frame claiming a longer
#: one is malformed.
MAX_TAIL: Final = 256
_RECENT_KEYS: Final = 1024  # finished/failed transfers remembered so late duplicates are ignored
_CRC_POLY: Final = 0xEDB88320  # zlib's crc32, bit-reflected


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the crc32 polynomial, both as bit-reflected 32-bit polynomials."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


@functools.lru_cache(maxsize=64)
def _shift_operator(length: int) -> int:
    """x^(8 * length) modulo the polynomial: what appending ``length`` bytes does to a crc.
    Cached because every chunk but the last has the same length."""
    p = 1 << 31  # x^0
    square = 1 << 30  # x^1, squared up to x^(2^k) as k goes
    n = 8 * length
    while n:
        if n & 1:
            p = _mulmod(square, p)
        n >>= 1
        square = _mulmod(square, square)
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b), without reading a or b (zlib's
    crc32_combine, which Python's zlib module does not expose)."""
    return _mulmod(_shift_operator(len2), crc1) ^ crc2


def is_chunk_frame(payload: bytes | memoryview) -> bool:
    return payload[:2] == CHUNK_MAGIC


@dataclass(frozen=True, slots=True)
class Transfer:
    """One chunked payload, ready to frame: any chunk can be (re)built on demand, so a sender
    can retransmit just the chunks a receiver lost (``fedbus.bus._repair``). ``tail``: a
    signature trailer that follows the payload on the wire (SIGNED; ``whole`` is then its
    length)."""

    payload: bytes
    chunk_bytes: int
    transfer: bytes
    crcs: tuple[int, ...]
    whole: int
    tail: bytes = b""

    @property
    def count(self) -> int:
        return len(self.crcs)

    def frame(self, index: int) -> bytes:
        n, size = len(self.payload), self.chunk_bytes
        start, end = index * size, min((index + 1) * size, n + len(self.tail))
        part: bytes | memoryview = memoryview(self.payload)[start:end]
        if end > n:  # the chunk that holds (part of) the trailer: at most one chunk's copy
            part = bytes(part) + self.tail[max(0, start - n):end - n]
        header = HEADER.pack(CHUNK_MAGIC, FRAME_VERSION, SIGNED if self.tail else 0,
                             self.transfer, index, self.count, n + len(self.tail),
                             self.crcs[index], self.whole)
        return header + part


def plan(payload: bytes, chunk_bytes: int, *, tail: bytes = b"") -> Transfer | None:
    """The chunked transfer for ``payload`` (followed by ``tail``, a signature trailer), or
    None when it travels whole (it fits, and does not start with the chunk magic)."""
    if chunk_bytes <= 0:
        raise BusError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if len(tail) > MAX_TAIL:
        raise BusError(f"a trailer of {len(tail)} bytes; at most {MAX_TAIL}")
    total = len(payload) + len(tail)
    if total <= chunk_bytes and not is_chunk_frame((bytes(payload[:2]) + tail)[:2]):
        return None
    count = max(1, -(-total // chunk_bytes))
    if tail:  # signed: the signature reads every byte; no crc32 pass
        return Transfer(payload, chunk_bytes, os.urandom(16), (0,) * count, len(tail), tail)
    view = memoryview(payload)
    sizes = [min(chunk_bytes, total - i * chunk_bytes) for i in range(count)]
    # the only pass over the payload's bytes
    crcs = tuple(zlib.crc32(view[i * chunk_bytes : (i + 1) * chunk_bytes]) for i in range(count))
    whole = 0
    for crc, size in zip(crcs, sizes, strict=True):
        whole = crc32_combine(whole, crc, size)
    return Transfer(payload, chunk_bytes, os.urandom(16), crcs, whole)


def frames(payload: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Yield what to publish for ``payload``: itself when it fits, else chunk frames in order.

    Frames are built lazily, so at most one chunk's copy exists beside the payload.
    """
    transfer = plan(payload, chunk_bytes)
    if transfer is None:
        yield payload
        return
    for index in range(transfer.count):
        yield transfer.frame(index)


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """Bounds on what a peer can make this process buffer."""

    max_message_bytes: int = 256 * 1024 * 1024
    max_buffered_bytes: int = 512 * 1024 * 1024
    max_partial_transfers: int = 64
    max_partials_per_topic: int = 2
    transfer_timeout_s: float = 120.0
    #: A partial transfer with no new chunk for this long asks its sender for the missing
    #: ones (a NACK, ``fedbus.bus._repair``), at most ``max_nacks`` times, then waits to expire.
    nack_after_s: float = 2.0
    max_nacks: int = 3

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.max_buffered_bytes, self.max_partial_transfers,
               self.max_partials_per_topic) <= 0:
            raise BusError("chunk limits must be positive")
        if self.transfer_timeout_s <= 0 or self.nack_after_s <= 0:
            raise BusError("transfer_timeout_s and nack_after_s must be positive")
        if self.max_nacks < 0:
            raise BusError("max_nacks must be >= 0")


_Key = tuple[str, str, bytes]


class Tailed(NamedTuple):
    """A SIGNED transfer, joined: its payload and its signature trailer, split apart as the
    chunks were joined (the bus above checks one against the other). ``hashed``: a BLAKE3
    hasher that has read exactly ``payload`` (None: ``blake3`` is not installed)."""

    payload: bytes
    tail: bytes
    hashed: Any = None


def _hasher() -> Any:
    """A hasher of signed payloads, or None where the ``security`` extra is missing (the
    bus above then refuses what it cannot check)."""
    try:
        from fedbus.signing import payload_hasher
        return payload_hasher()
    except FedbusError:
        return None


def _split(parts: list[bytes | memoryview], n: int, hashed: Any = None) -> Tailed:
    head: list[bytes | memoryview] = []
    tail: list[bytes | memoryview] = []
    at = 0
    for p in parts:
        if at + len(p) <= n:
            head.append(p)
        elif at >= n:
            tail.append(p)
        else:
            view = memoryview(p)
            head.append(view[:n - at])
            tail.append(view[n - at:])
        at += len(p)
    return Tailed(b"".join(head), b"".join(tail), hashed)


@dataclass(slots=True)
class _Partial:
    started: float
    count: int
    total: int
    digest: int  # the declared crc32 of the whole payload (SIGNED: the trailer's length)
    signed: bool
    parts: dict[int, bytes | memoryview] = field(default_factory=dict)
    crcs: dict[int, int] = field(default_factory=dict)
    size: int = 0
    progress: float = 0.0  # when the last new chunk arrived
    nacks: int = 0
    hasher: Any = None  # SIGNED: the payload's hash so far, chunk by chunk in order
    hashed: int = 0  # how many chunks, from the first, it has read
    hashed_bytes: int = 0

    def hash_in_order(self) -> None:
        """Feed the hasher the chunks now in order after what it has read (the one that just
        came, while it is in cache; after a gap, the ones that waited behind it); only the
        payload's bytes: the trailer is not signed."""
        end = self.total - self.digest
        while self.hasher is not None and self.hashed in self.parts:
            data = self.parts[self.hashed]
            take = max(0, min(len(data), end - self.hashed_bytes))
            if take:
                self.hasher.update(memoryview(data)[:take])
            self.hashed += 1
            self.hashed_bytes += len(data)


#: At most this many chunk indices in one NACK; a later one asks for the rest.
MAX_NACK_INDICES: Final = 4096


class Reassembler:
    """Turns a stream of frames on topics back into whole payloads, within ``ChunkLimits``."""

    def __init__(
        self, limits: ChunkLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ChunkLimits()
        self._clock = clock
        self._partials: OrderedDict[_Key, _Partial] = OrderedDict()
        # value: the reason later chunks of that transfer are dropped ("duplicate" once complete)
        self._recent: OrderedDict[_Key, str] = OrderedDict()
        self._buffered = 0
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def partial_transfers(self) -> int:
        return len(self._partials)

    def feed(
        self, topic: str, payload: bytes | memoryview, *, route: str = "",
        admit: Callable[[str, int], bool] | None = None,
    ) -> bytes | Tailed | None:
        """Accept one delivered payload; return a whole payload when one is complete (a
        SIGNED transfer's as ``Tailed``: the payload and its trailer).

        ``route`` separates independent delivery streams of the same topic (two overlapping
        subscriptions each get their own copy of every frame). ``admit(topic, total)`` is asked
        before a new multi-chunk transfer is buffered.

        A chunk frame may come as a memoryview (the MQTT bus's receive buffer): its data is
        kept as a view, not copied, until the transfer is joined into bytes.
        """
        self.expire()
        if not is_chunk_frame(payload):
            if len(payload) > self.limits.max_message_bytes:
                self._reject("too_large", topic, None, size=len(payload))
                return None
            return bytes(payload) if isinstance(payload, memoryview) else payload
        self.counters["chunks_received"] += 1
        if len(payload) < HEADER.size:
            self._reject("short_header", topic, None, size=len(payload))
            return None
        magic, version, flags, transfer, index, count, total, crc, digest = HEADER.unpack_from(
            payload
        )
        signed = flags == SIGNED
        del magic
        data = payload[HEADER.size :]
        key: _Key = (route, topic, transfer)
        if version != FRAME_VERSION:
            # A sender on another fedbus release: say so once per transfer, not per chunk.
            if key not in self._recent:
                log.warning("refuse_frame_version", topic=topic, version=version,
                            expected=FRAME_VERSION,
                            fix="run the same fedbus release on every node of the federation")
                self._remember(key, "bad_version")
            self._reject("bad_version", topic, transfer, version=version)
            return None
        if key in self._recent:
            self._reject(self._recent[key], topic, transfer, index=index)
            return None
        if total > self.limits.max_message_bytes:
            self._reject("too_large", topic, transfer, total=total)
            self._fail(key)
            return None
        if count < 1 or index >= count or len(data) > total or (count - 1) > total:
            self._reject("bad_bounds", topic, transfer, index=index, count=count, total=total)
            self._fail(key)
            return None
        bad_tail = signed and (crc != 0 or not 0 < digest <= min(MAX_TAIL, total))
        if flags not in (0, SIGNED) or bad_tail:
            self._reject("bad_flags", topic, transfer, index=index, flags=flags)
            self._fail(key)
            return None
        if not signed and zlib.crc32(data) != crc:
            # Only this copy is bad; a QoS 1 redelivery of the same chunk may still be good.
            self._reject("bad_crc", topic, transfer, index=index)
            return None
        part = self._partials.get(key)
        if part is None:
            if count == 1:
                return self._finish_single(key, data, total, digest, crc, signed)
            if admit is not None and not admit(topic, total):
                self._reject("not_admitted", topic, transfer, total=total)
                self._remember(key)
                return None
            self._evict_oldest_on(route, topic)
            if len(self._partials) >= self.limits.max_partial_transfers:
                self._reject("too_many_transfers", topic, transfer, limit=len(self._partials))
                self._remember(key)
                return None
            now = self._clock()
            part = _Partial(started=now, count=count, total=total, digest=digest, signed=signed,
                            progress=now, hasher=_hasher() if signed else None)
            self._partials[key] = part
        elif (part.count, part.total, part.digest, part.signed) != (count, total, digest, signed):
            self._reject("inconsistent", topic, transfer, index=index)
            self._fail(key)
            return None
        if index in part.parts:
            self._reject("duplicate", topic, transfer, index=index)
            return None
        if part.size + len(data) > total:
            self._reject("bad_bounds", topic, transfer, index=index, total=total)
            self._fail(key)
            return None
        if self._buffered + len(data) > self.limits.max_buffered_bytes:
            self._reject("buffer_full", topic, transfer, buffered=self._buffered)
            self._fail(key)
            return None
        part.parts[index] = data
        part.crcs[index] = crc
        part.hash_in_order()
        part.progress = self._clock()
        part.size += len(data)
        self._buffered += len(data)
        if len(part.parts) < part.count:
            return None
        del self._partials[key]
        self._buffered -= part.size
        self._remember(key, "duplicate")
        if part.size != total:
            self._reject("bad_digest", topic, transfer, size=part.size, total=total)
            return None
        if signed:  # the trailer's signature checks every byte (the bus above)
            self.counters["transfers_completed"] += 1
            return _split([part.parts[i] for i in range(part.count)], total - digest,
                          part.hasher if part.hashed == part.count else None)
        combined = 0
        for i in range(part.count):
            combined = crc32_combine(combined, part.crcs[i], len(part.parts[i]))
        if combined != digest:
            self._reject("bad_digest", topic, transfer, total=total)
            return None
        self.counters["transfers_completed"] += 1
        return b"".join(part.parts[i] for i in range(part.count))

    def expire(self) -> int:
        """Drop partial transfers older than the time limit; return how many were dropped."""
        deadline = self._clock() - self.limits.transfer_timeout_s
        dropped = 0
        while self._partials:
            key, part = next(iter(self._partials.items()))
            if part.started > deadline:
                break
            self._partials.popitem(last=False)
            self._buffered -= part.size
            self._remember(key)
            dropped += 1
            self.counters["transfers_expired"] += 1
            log.warning(
                "expire_transfer",
                topic=key[1],
                transfer=key[2].hex(),
                have=len(part.parts),
                count=part.count,
            )
        return dropped

    def stalled(self) -> list[tuple[str, bytes, list[int]]]:
        """Partial transfers that made no progress for ``nack_after_s`` and may still ask for
        their missing chunks: (topic, transfer id, missing indices), one entry per transfer
        even when it arrives on several routes. Each call counts as one NACK for them."""
        now = self._clock()
        wanted: dict[tuple[str, bytes], set[int]] = {}
        for (_route, topic, transfer), part in self._partials.items():
            lim = self.limits
            if part.nacks >= lim.max_nacks or now - part.progress < lim.nack_after_s:
                continue
            part.nacks += 1
            part.progress = now  # the next NACK waits as long again
            # the first few missing only: a transfer may claim a million chunks
            lacking = itertools.islice((i for i in range(part.count) if i not in part.parts),
                                       MAX_NACK_INDICES)
            wanted.setdefault((topic, transfer), set()).update(lacking)
        self.counters["nacks"] += len(wanted)
        return [(topic, transfer, sorted(missing)[:MAX_NACK_INDICES])
                for (topic, transfer), missing in wanted.items() if missing]

    def _evict_oldest_on(self, route: str, topic: str) -> None:
        """Keep at most ``max_partials_per_topic - 1`` open on this topic before opening one
        more: a sender that starts over (or a flood on its topic) displaces only itself."""
        mine = [k for k in self._partials if k[0] == route and k[1] == topic]
        for key in mine[: max(0, len(mine) - self.limits.max_partials_per_topic + 1)]:
            part = self._partials.pop(key)
            self._buffered -= part.size
            self._remember(key)
            self.counters["transfers_dropped"] += 1
            log.warning("evict_transfer", topic=topic, transfer=key[2].hex(),
                        have=len(part.parts), count=part.count)

    def _finish_single(
        self, key: _Key, data: bytes | memoryview, total: int, digest: int, crc: int,
        signed: bool,
    ) -> bytes | Tailed | None:
        self._remember(key, "duplicate")
        # One chunk: its crc (already checked against its bytes) is the whole payload's.
        if len(data) != total or (not signed and crc != digest):
            self._reject("bad_digest", key[1], key[2], size=len(data), total=total)
            return None
        self.counters["transfers_completed"] += 1
        if not signed:
            return bytes(data)
        hasher = _hasher()
        if hasher is not None:
            hasher.update(memoryview(data)[:total - digest])
        return _split([data], total - digest, hasher)

    def _fail(self, key: _Key) -> None:
        part = self._partials.pop(key, None)
        if part is not None:
            self._buffered -= part.size
        self._remember(key)
        self.counters["transfers_dropped"] += 1

    def _remember(self, key: _Key, why: str = "dead_transfer") -> None:
        self._recent[key] = why
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_KEYS:
            self._recent.popitem(last=False)

    def _reject(self, reason: str, topic: str, transfer: bytes | None, **info: int) -> None:
        self.counters["chunks_rejected"] += 1
        self.rejected[reason] += 1
        # QoS 1 redelivers: duplicates are routine, everything else is worth a warning (a wrong
        # frame version has had its one warning, refuse_frame_version, already).
        routine = reason in ("duplicate", "dead_transfer", "bad_version")
        emit = log.debug if routine or not worth_a_line(self.rejected[reason]) else log.warning
        emit(
            "drop_chunk",
            reason=reason,
            refused=self.rejected[reason],  # of this reason so far (a few lines of a flood)
            topic=topic,
            transfer=transfer.hex() if transfer else None,
            **info,
        )
