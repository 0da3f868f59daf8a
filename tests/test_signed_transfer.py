"""A signed payload that travels in chunks: its trailer is framed beside it and split off
again on receipt (no copy of the payload either way), and its chunks carry no crc32 because
the signature checks every byte (fedbus.bus._chunking, SIGNED)."""

from __future__ import annotations

import os

import pytest
from blake3 import blake3

from fedbus.bus._base import Message
from fedbus.bus._chunking import HEADER, MAX_TAIL, SIGNED, Reassembler, Tailed, plan
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.bus.signed import SignedBus
from fedbus.errors import BusError
from fedbus.signing import SignatureError, Signer, Verifier, generate_key


def _keys() -> tuple[Signer, Verifier]:
    key, pub = generate_key()
    return Signer("t0", key), Verifier({"t0": pub}, required=True)


def _feed(r: Reassembler, frames: list[bytes]) -> bytes | Tailed | None:
    out = [w for f in frames if (w := r.feed("t", f)) is not None]
    assert len(out) <= 1
    return out[0] if out else None


@pytest.mark.parametrize("size", [-10, 930, 950, 999, 1000, 1001, 1929, 1930, 3000, 4000])
def test_a_trailer_comes_back_apart_wherever_the_chunk_boundary_falls(size: int) -> None:
    signer, verifier = _keys()
    # the trailer is 71 bytes: it straddles a boundary at 930 and 1929, starts one at 1000;
    # -10: a short payload that starts with the chunk magic (a one-chunk transfer)
    payload = b"FK" + os.urandom(8) if size < 0 else os.urandom(size)
    tail = signer.trailer(payload)
    transfer = plan(payload, 1000, tail=tail)
    assert transfer is not None and transfer.whole == len(tail)
    assert set(transfer.crcs) == {0}  # no crc32 pass: the signature reads every byte
    frames = [transfer.frame(i) for i in range(transfer.count)]
    assert all(HEADER.unpack_from(f)[2] == SIGNED for f in frames)
    for order in (frames, frames[::-1]):  # in order, and the worst order
        got = _feed(Reassembler(), order)
        assert isinstance(got, Tailed) and (got.payload, got.tail) == (payload, tail)
        # hashed as the chunks came (a chunk that came early, once the gap before it filled)
        assert got.hashed.digest() == blake3(payload).digest()
        verifier._good.clear()  # no remembered signature: each check below does the work
        for _ in range(2):  # one delivery, checked by two subscriptions: the hash is shared
            assert verifier.verify_tail(got.payload, got.tail, got.hashed) == "t0"
            verifier._good.clear()
        assert verifier.verify_tail(got.payload, got.tail) == "t0"  # and from the bytes


def test_a_small_signed_payload_still_travels_whole() -> None:
    signer, _ = _keys()
    assert plan(b"x" * 10, 1000, tail=signer.trailer(b"x" * 10)) is None
    with pytest.raises(BusError, match="trailer"):
        plan(b"x" * 10, 1000, tail=b"t" * (MAX_TAIL + 1))


def test_malformed_signed_frames_are_refused_and_counted() -> None:
    signer, _ = _keys()
    payload = os.urandom(3000)
    transfer = plan(payload, 1000, tail=signer.trailer(payload))
    assert transfer is not None
    good = [transfer.frame(i) for i in range(transfer.count)]

    def retag(frame: bytes, **change: int) -> bytes:
        names = ("magic", "version", "flags", "transfer", "index", "count", "total", "crc",
                 "digest")
        fields = dict(zip(names, HEADER.unpack_from(frame), strict=True))
        fields.update(change)
        return HEADER.pack(*fields.values()) + frame[HEADER.size:]

    for bad, reason in ((retag(good[0], flags=0x80), "bad_flags"),
                        (retag(good[0], digest=MAX_TAIL + 1), "bad_flags"),
                        (retag(good[0], digest=0), "bad_flags"),
                        (retag(good[0], crc=7), "bad_flags")):
        r = Reassembler()
        assert _feed(r, [bad, *good[1:]]) is None
        assert r.rejected[reason] == 1
    # a chunk that says "signed" where its transfer began unsigned, or the reverse
    r = Reassembler()
    plain = plan(payload, 1000)
    assert plain is not None
    mixed = [plain.frame(0), retag(good[1], transfer=plain.transfer)]
    assert _feed(r, mixed) is None and r.rejected["inconsistent"] == 1


async def test_a_chunked_signed_update_is_checked_without_a_copy_and_tampering_is_caught(
) -> None:
    key, pub = generate_key()
    broker = MemoryBroker()
    sender = SignedBus(MemoryBus(broker, "t0", chunk_bytes=256 * 1024), Signer("t0", key),
                       Verifier({"t0": pub}, required=True))
    receiver = SignedBus(MemoryBus(broker, "agg", chunk_bytes=256 * 1024), Signer("agg", key),
                         Verifier({"t0": pub}, required=True))
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with sender, receiver, receiver.subscribe("u/#") as sub:
        await sender.publish("u/t0", payload)
        msg = await sub.get(timeout=5)
        assert msg.payload == payload and msg.signer == "t0" and not msg.tail
        # a chunk changed on the way (the crcs no longer guard it): the signature refuses it
        received: list[Message] = []

        def tamper(frame: bytes) -> bytes:
            return frame[:-1] + bytes([frame[-1] ^ 1]) if frame[HEADER.size:] else frame

        inner = sender.inner
        original = inner._send_frame

        def send(topic: str, frame: bytes, retain: bool) -> None:
            if HEADER.unpack_from(frame)[4] == 2:  # chunk 2 of the transfer
                frame = tamper(frame)
            original(topic, frame, retain)

        inner._send_frame = send  # type: ignore[method-assign]
        await sender.publish("u/t0", payload)
        with pytest.raises(TimeoutError):
            received.append(await sub.get(timeout=1))
        assert not received
        assert receiver.stats["signature_bad_signature"] == 1


async def test_two_subscriptions_both_check_one_chunked_signed_message() -> None:
    """One delivery reaches both (overlapping filters): each check starts from the bus's
    hash of the payload, and neither spoils it for the other."""
    key, pub = generate_key()
    broker = MemoryBroker()
    verifier = Verifier({"t0": pub}, required=True)
    sender = SignedBus(MemoryBus(broker, "t0", chunk_bytes=256 * 1024), Signer("t0", key),
                       verifier)
    receiver = SignedBus(MemoryBus(broker, "agg", chunk_bytes=256 * 1024), Signer("agg", key),
                         verifier)
    payload = os.urandom(2 * 1024 * 1024)
    async with sender, receiver, receiver.subscribe("u/#") as a, receiver.subscribe("u/t0") as b:
        await sender.publish("u/t0", payload)
        got = [await a.get(timeout=5), await b.get(timeout=5)]
    assert [(m.payload == payload, m.signer) for m in got] == [(True, "t0")] * 2
    assert receiver.stats["signature_refused"] == 0


def test_a_trailer_with_extra_bytes_before_it_is_refused() -> None:
    signer, verifier = _keys()
    payload = os.urandom(100)
    tail = signer.trailer(payload)
    with pytest.raises(SignatureError, match="malformed"):
        verifier.verify_tail(payload[:-1], payload[-1:] + tail)
    with pytest.raises(SignatureError):
        verifier.verify_tail(payload[1:], tail)
