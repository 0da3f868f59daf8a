"""Unit tests of chunk splitting and bounded reassembly (no bus, no broker)."""

from __future__ import annotations

import os
import random
import zlib

import pytest
from structlog.testing import capture_logs

from fedbus.bus._chunking import (
    HEADER,
    ChunkLimits,
    Reassembler,
    crc32_combine,
    frames,
    is_chunk_frame,
)
from fedbus.errors import BusError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed_all(r: Reassembler, parts: list[bytes], topic: str = "t") -> list[bytes]:
    return [whole for p in parts if (whole := r.feed(topic, p)) is not None]


def test_small_payload_passes_through_untouched() -> None:
    payload = b"FB\x01codec frame"
    parts = list(frames(payload, 1024))
    assert parts == [payload]
    assert Reassembler().feed("t", payload) is payload


def test_payload_with_chunk_magic_is_wrapped_and_restored() -> None:
    parts = list(frames(b"FK-looking", 1024))
    assert len(parts) == 1 and parts[0] != b"FK-looking" and is_chunk_frame(parts[0])
    assert feed_all(Reassembler(), parts) == [b"FK-looking"]


def test_empty_and_exact_multiple_sizes() -> None:
    for size in (0, 1, 99, 100, 101, 1000):
        payload = os.urandom(size)
        parts = list(frames(payload, 100))
        assert feed_all(Reassembler(), parts) == [payload]


def test_out_of_order_and_duplicates() -> None:
    payload = os.urandom(10_000)
    parts = list(frames(payload, 1000))
    assert len(parts) == 10
    shuffled = parts + parts[:3]
    random.Random(7).shuffle(shuffled)
    r = Reassembler()
    assert feed_all(r, shuffled) == [payload]
    assert r.counters["transfers_completed"] == 1
    assert r.rejected["duplicate"] >= 1
    assert r.buffered_bytes == 0 and r.partial_transfers == 0


def test_same_transfer_on_two_routes_completes_on_each() -> None:
    parts = list(frames(os.urandom(3000), 1000))
    r = Reassembler()
    got = [r.feed("t", p, route=route) for p in parts for route in ("a", "b")]
    assert sum(g is not None for g in got) == 2


def test_interleaved_transfers_on_one_topic() -> None:
    a, b = os.urandom(5000), os.urandom(4000)
    pa, pb = list(frames(a, 1000)), list(frames(b, 1000))
    mixed = [p for pair in zip(pa, pb, strict=False) for p in pair] + pa[len(pb) :]
    assert sorted(feed_all(Reassembler(), mixed)) == sorted([a, b])


def test_corrupted_chunk_is_dropped_and_good_copy_still_completes() -> None:
    payload = os.urandom(3000)
    parts = list(frames(payload, 1000))
    bad = bytearray(parts[1])
    bad[-1] ^= 0xFF
    r = Reassembler()
    with capture_logs() as logs:
        assert r.feed("t", bytes(bad)) is None
    assert r.rejected["bad_crc"] == 1
    assert logs[0]["event"] == "drop_chunk" and logs[0]["reason"] == "bad_crc"
    assert feed_all(r, parts) == [payload]


def test_forged_digest_is_rejected() -> None:
    parts = list(frames(os.urandom(2000), 1000))
    r = Reassembler()
    forged = []
    for p in parts:
        fields = list(HEADER.unpack_from(p))
        fields[-1] ^= 1
        forged.append(HEADER.pack(*fields) + p[HEADER.size :])
    assert feed_all(r, forged) == []
    assert r.rejected["bad_digest"] == 1


def _retag(frame: bytes, **change: object) -> bytes:
    """``frame`` with header fields replaced (names as in the layout), its bytes kept."""
    names = ("magic", "version", "flags", "transfer", "index", "count", "total", "crc", "whole")
    fields = dict(zip(names, HEADER.unpack_from(frame), strict=True))
    fields.update(change)
    return HEADER.pack(*fields.values()) + frame[HEADER.size :]


def test_swapped_chunks_with_valid_crcs_are_caught() -> None:
    # Prepare: chunks 1 and 2 trade places; each keeps a crc that matches its own bytes
    parts = list(frames(os.urandom(3000), 1000))
    swapped = [parts[0], _retag(parts[2], index=1), _retag(parts[1], index=2)]
    # Execute
    r = Reassembler()
    out = feed_all(r, swapped)
    # Assert: no chunk is bad on its own, the whole payload's crc is
    assert out == [] and r.rejected["bad_crc"] == 0 and r.rejected["bad_digest"] == 1


def test_chunk_spliced_from_another_transfer_is_caught() -> None:
    # Prepare: a chunk of payload b relabelled as chunk 1 of payload a, crcs and all
    a, b = os.urandom(3000), os.urandom(3000)
    pa, pb = list(frames(a, 1000)), list(frames(b, 1000))
    a_id, a_whole = HEADER.unpack_from(pa[0])[3], HEADER.unpack_from(pa[0])[8]
    foreign = _retag(pb[1], transfer=a_id)  # keeps b's whole crc: inconsistent
    disguised = _retag(pb[1], transfer=a_id, whole=a_whole)  # a's whole crc: wrong sum
    # Execute
    r1, r2 = Reassembler(), Reassembler()
    out1 = feed_all(r1, [pa[0], foreign, pa[2]])
    out2 = feed_all(r2, [pa[0], disguised, pa[2]])
    # Assert
    assert out1 == [] and r1.rejected["inconsistent"] == 1
    assert out2 == [] and r2.rejected["bad_digest"] == 1


def test_missing_chunk_never_completes_and_expires() -> None:
    clock = Clock()
    r = Reassembler(ChunkLimits(transfer_timeout_s=10), clock=clock)
    parts = list(frames(os.urandom(5000), 1000))
    assert feed_all(r, parts[:2] + parts[3:]) == []
    assert r.partial_transfers == 1
    clock.now = 11
    assert r.expire() == 1 and r.counters["transfers_expired"] == 1


def test_wrong_total_is_caught() -> None:
    # every chunk agrees on a total 1 byte short of (or above) what the chunks carry
    for delta in (-1, 1):
        parts = list(frames(os.urandom(3000), 1000))
        lying = [_retag(p, total=3000 + delta) for p in parts]
        r = Reassembler()
        assert feed_all(r, lying) == []
        assert r.rejected["bad_bounds"] + r.rejected["bad_digest"] == 1


def test_old_frame_version_is_refused_with_a_reason() -> None:
    parts = [_retag(p, version=1) for p in frames(os.urandom(3000), 1000)]
    r = Reassembler()
    with capture_logs() as logs:
        assert feed_all(r, parts) == []
    assert r.rejected["bad_version"] == 3 and r.partial_transfers == 0
    refusals = [e for e in logs if e["event"] == "refuse_frame_version"]
    assert len(refusals) == 1 and refusals[0]["version"] == 1 and "release" in refusals[0]["fix"]


def test_crc32_combine_matches_zlib() -> None:
    for a, b in [(b"", b""), (b"abc", b""), (b"", b"xyz"), (os.urandom(999), os.urandom(70_001))]:
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_short_and_inconsistent_frames() -> None:
    r = Reassembler()
    assert r.feed("t", b"FK\x01") is None
    assert r.rejected["short_header"] == 1
    a = list(frames(os.urandom(3000), 1000))
    fields = list(HEADER.unpack_from(a[1]))
    fields[6] = 2999  # total differs from the first chunk's
    assert r.feed("t", a[0]) is None
    assert r.feed("t", HEADER.pack(*fields) + a[1][HEADER.size :]) is None
    assert r.rejected["inconsistent"] == 1
    assert r.feed("t", a[2]) is None  # the transfer is dead now
    assert r.partial_transfers == 0 and r.buffered_bytes == 0


def test_oversized_total_is_rejected_before_buffering() -> None:
    r = Reassembler(ChunkLimits(max_message_bytes=5000))
    parts = list(frames(os.urandom(6000), 1000))
    assert feed_all(r, parts) == []
    assert r.rejected["too_large"] == 1 and r.rejected["dead_transfer"] == 5
    assert r.buffered_bytes == 0
    assert r.feed("t", os.urandom(5001)) is None  # an unchunked payload is bounded too
    assert r.rejected["too_large"] == 2


def test_lying_total_cannot_overfill() -> None:
    payload = os.urandom(3000)
    parts = list(frames(payload, 1000))
    fields = list(HEADER.unpack_from(parts[0]))
    r = Reassembler()
    big = os.urandom(1500)
    fields[7] = zlib.crc32(big)
    assert r.feed("t", HEADER.pack(*fields) + big) is None
    assert r.feed("t", parts[1]) is None
    assert r.feed("t", parts[2]) is None  # 1500 + 1000 + 1000 > total 3000
    assert r.rejected["bad_bounds"] == 1


def test_too_many_partial_transfers() -> None:
    r = Reassembler(ChunkLimits(max_partial_transfers=2))
    transfers = [list(frames(os.urandom(2000), 1000)) for _ in range(3)]
    for i, t in enumerate(transfers):
        r.feed(f"t{i}", t[0])
    assert r.partial_transfers == 2
    assert r.rejected["too_many_transfers"] == 1
    assert r.feed("t0", transfers[0][1]) is not None  # the admitted ones still complete
    assert r.feed("t2", transfers[2][1]) is None  # the refused one stays refused


def test_a_flood_on_one_topic_evicts_only_that_topics_transfers() -> None:
    # Prepare: a real transfer on "good", then 64 fake first chunks on "flood"
    r = Reassembler(ChunkLimits(max_partial_transfers=8, max_partials_per_topic=2))
    good = list(frames(os.urandom(3000), 1000))
    r.feed("good", good[0])
    # Execute
    for _ in range(64):
        r.feed("flood", next(frames(os.urandom(2000), 1000)))
    # Assert: the flood holds at most its own two slots; the real transfer still completes
    assert r.partial_transfers == 3
    assert r.counters["transfers_dropped"] == 62
    assert r.feed("good", good[1]) is None
    assert r.feed("good", good[2]) is not None


def test_admission_refuses_transfers_before_buffering_them() -> None:
    # Prepare: only "granted" may open a transfer, and only up to 5000 bytes
    r = Reassembler()
    seen: list[tuple[str, int]] = []

    def admit(topic: str, total: int) -> bool:
        seen.append((topic, total))
        return topic == "granted" and total <= 5000

    stranger = list(frames(os.urandom(3000), 1000))
    too_big = list(frames(os.urandom(6000), 1000))
    ok = list(frames(os.urandom(3000), 1000))
    # Execute
    for f in stranger:
        assert r.feed("stranger", f, admit=admit) is None
    for f in too_big:
        assert r.feed("granted", f, admit=admit) is None
    out = [r.feed("granted", f, admit=admit) for f in ok]
    # Assert: refused once per transfer (later chunks are dead), nothing buffered for them
    assert r.rejected["not_admitted"] == 2
    assert ("stranger", 3000) in seen and ("granted", 6000) in seen
    assert out[-1] is not None and r.buffered_bytes == 0


def test_buffered_bytes_bound() -> None:
    r = Reassembler(ChunkLimits(max_buffered_bytes=2500))
    a = list(frames(os.urandom(4000), 1000))
    for p in a[:2]:
        r.feed("t", p)
    b = list(frames(os.urandom(4000), 1000))
    assert r.feed("t", b[0]) is None
    assert r.rejected["buffer_full"] == 1
    assert r.buffered_bytes == 2000


def test_expiry_drops_stale_partials_and_counts_them() -> None:
    clock = Clock()
    r = Reassembler(ChunkLimits(transfer_timeout_s=10), clock=clock)
    parts = list(frames(os.urandom(3000), 1000))
    r.feed("t", parts[0])
    clock.now = 5
    r.feed("t", parts[1])
    assert r.partial_transfers == 1
    clock.now = 10.5
    with capture_logs() as logs:
        assert r.expire() == 1
    assert logs[0]["event"] == "expire_transfer"
    assert r.counters["transfers_expired"] == 1 and r.buffered_bytes == 0
    assert r.feed("t", parts[2]) is None  # the late chunk does not resurrect it
    assert r.partial_transfers == 0


def test_bad_arguments() -> None:
    with pytest.raises(BusError):
        list(frames(b"x", 0))
    with pytest.raises(BusError):
        ChunkLimits(max_partial_transfers=0)
