"""The front door: every message a service acts on enters through here.

    topic -> expected channel, kinds and senders -> limits (from the model) -> decode (in a
    worker thread when large) -> job / kind / sender checks -> dedupe -> [the service admits
    it: round bookkeeping] -> the codec stages (``decode_update``) -> tensor checks

A service declares what it expects (``Entry``: a topic filter, the kinds, who may send them
and the decode limits) and receives only what passed; it never parses raw payloads itself.
Every refusal is counted under one vocabulary (``Rejections``, reasons below) and logged
with its sender, never raised into the service.

Reasons: ``bad_topic``, ``unexpected_topic``, ``bad_kind``, ``wrong_job``, ``spoofed_sender``
(the envelope names another sender than the topic), ``unknown_sender`` (not one the wiring
names for that topic), ``wrong_signer`` (signed, by someone else than that sender: the
signature itself was checked by the bus, ``fedbus.bus.signed``), ``duplicate``, the codec's
own (``frame_too_large``, ``bad_header``, ``bad_dtype`` ...), and for updates
``bad_num_examples``, ``bad_update_codec``, ``wrong_tensors``, ``wrong_shape``,
``wrong_dtype``, ``non_finite``, ``norm_exceeded``.

What the door trusts: a topic's sender level where the broker ties it to credentials
(``fedbus acl``); on an anonymous broker the checks only bound the damage (see
docs/architecture.md, "What each service trusts").
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Message
from fedbus.codec import Envelope, Limits, decode, peek_data_size
from fedbus.compress import PackedDelta, decode_update
from fedbus.errors import CodecError, FedbusError, UpdateRejected
from fedbus.log import worth_a_line
from fedbus.wire import split_tensors

__all__ = [
    "OFFLOAD_BYTES",
    "PRESENCE_LIMITS",
    "Admitted",
    "CheckedUpdate",
    "Door",
    "Entry",
    "Rejections",
    "SeenIds",
    "check_update",
    "check_update_tensors",
    "checked_num_examples",
    "finite_metrics",
    "is_big",
    "model_limits",
]

log = structlog.get_logger(__name__)

# Decoding, folding or encoding this many bytes or more happens in a worker thread, so the
# event loop (and with it MQTT keepalives) never stalls on a big model.
OFFLOAD_BYTES = 1 << 20
# Room for an envelope's msgpack header beside its tensors: names, shapes, metrics.
_HEADER_SLACK = 64 << 10
_HEADER_PER_TENSOR = 512
#: Presence, acks, grants, queries: small control messages with no tensors.
PRESENCE_LIMITS: Final = Limits(max_frame_bytes=64 << 10, max_header_bytes=64 << 10,
                                max_decompressed_bytes=0, max_tensors=0)


def model_limits(weights: Mapping[str, np.ndarray], copies: int, base: Limits) -> Limits:
    """Decode limits for a message that carries ``copies`` model-sized sets of tensors (an
    update with SCAFFOLD's control delta: 2) and nothing bigger: a frame that declares more
    is refused before one byte of it is decompressed or allocated."""
    nbytes = sum(int(v.nbytes) for v in weights.values()) * copies
    tensors = len(weights) * copies
    header = _HEADER_SLACK + _HEADER_PER_TENSOR * tensors
    return Limits(
        # zstd on incompressible data can grow it by a hair; the header travels beside it
        max_frame_bytes=min(base.max_frame_bytes, nbytes + nbytes // 64 + header + 4096),
        max_header_bytes=min(base.max_header_bytes, header),
        max_decompressed_bytes=min(base.max_decompressed_bytes, nbytes),
        max_tensors=min(base.max_tensors, tensors),
        max_dims=base.max_dims,
        allowed_dtypes=base.allowed_dtypes,
    )


def check_update_tensors(
    reference: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
    max_norm: float | None = None,
) -> float:
    """An update must match the global model exactly in names, shapes and dtypes, and be
    finite: one NaN would poison every coordinate it is averaged into. Returns its L2 norm,
    refused above ``max_norm``."""
    if reference.keys() != delta.keys():
        missing = sorted(set(reference) - set(delta))[:5]
        extra = sorted(set(delta) - set(reference))[:5]
        raise UpdateRejected("wrong_tensors", f"missing {missing}, unexpected {extra}")
    sq = 0.0
    packed = delta if isinstance(delta, PackedDelta) else None
    for name, ref in reference.items():
        if packed is not None and packed.packed(name):
            # decoded against ``ref``: its shape and dtype; finite scales (decode_update)
            s = packed.sq_norm(name)
            if not math.isfinite(s):
                raise UpdateRejected("norm_exceeded", f"{name}: norm overflows float")
            sq += s
            continue
        d = delta[name]
        if d.shape != ref.shape:
            raise UpdateRejected("wrong_shape", f"{name}: {d.shape}, model has {ref.shape}")
        if d.dtype != ref.dtype:
            raise UpdateRejected("wrong_dtype", f"{name}: {d.dtype}, model has {ref.dtype}")
        if d.dtype.kind == "f":
            flat = d.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):
                s = float(np.dot(flat, flat)) if flat.size else 0.0
            if not math.isfinite(s):
                # dot overflows to inf for finite 1e30s too: tell NaN/Inf apart from "huge"
                if not np.isfinite(d).all():
                    raise UpdateRejected("non_finite", f"{name} holds NaN or Inf")
                raise UpdateRejected("norm_exceeded", f"{name}: norm overflows float")
            sq += s
    norm = math.sqrt(sq)
    if max_norm is not None and norm > max_norm:
        raise UpdateRejected("norm_exceeded",
                             f"L2 norm {norm:.4g} > round.max_update_norm {max_norm:g}")
    return norm


def checked_num_examples(meta: Mapping[str, Any], max_examples: int) -> int:
    """The update's example count: a positive int no larger than ``max_examples``."""
    n = meta.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= max_examples:
        raise UpdateRejected("bad_num_examples", f"num_examples={n!r} (max {max_examples})")
    return n


class Rejections:
    """Counts rejected messages by reason and logs them with their sender (each of the first
    ten of a reason, then every thousandth: ``fedbus.log.worth_a_line``).

    ``since_report()`` gives what was rejected since the last call, so rejections that land
    between two rounds show up in the next round's report instead of nowhere.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def reject(self, reason: str, detail: str, **context: Any) -> None:
        self.counts[reason] += 1
        if worth_a_line(self.counts[reason]):  # all counted; a flood is a few lines
            log.warning("message_rejected", node=self.node, reason=reason, detail=detail,
                        total=self.counts[reason], **context)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def since_report(self) -> dict[str, int]:
        new = {k: v - self._reported[k] for k, v in self.counts.items() if v > self._reported[k]}
        self._reported = Counter(self.counts)
        return new


class SeenIds:
    """A bounded set of recently seen message ids: duplicates (QoS 1 redelivery, replays) are
    recognised without unbounded memory."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, msg_id: str) -> bool:
        """Record ``msg_id``; False if it was already there."""
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


#: Who may send on an entry's topics: a set of node ids (anything with ``in``: a simulated
#: population), or ``None`` for anyone.
Senders = Container[str] | None
#: Runs a function away from the event loop: ``await offload(fn, *args)``.
Offload = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Entry:
    """What a service accepts on one topic filter.

    ``topic_sender``: the topic's last level names the publisher (``update/<agg>/<me>``,
    ``presence/<node>``, ``model/<agg>``...), so the envelope must name the same one; the
    recipient-addressed channels (``control/<me>``, ``reply/<me>``) set it False and only
    the envelope's sender is checked against ``senders``. ``limits``: fixed, or asked for
    each message (limits that follow the model the service holds now). ``dedupe``: refuse a
    message id seen before (a service that looks at a message again later says False).
    """

    filter: str
    kinds: frozenset[str]
    senders: Senders = None
    limits: Limits | Callable[[], Limits] = PRESENCE_LIMITS
    topic_sender: bool = True
    dedupe: bool = True
    #: Counted under this prefix (``presence_bad_header``) when it helps tell entries apart.
    label: str = ""
    #: A sender outside ``senders`` is passed over silently, not counted: a shared channel
    #: where other nodes' messages are normal (``presence/+``: watchers, stores, siblings).
    others_ignored: bool = False
    #: Who may sign here when it is not the sender itself: the instances of one node sign
    #: with its key, while a lease names the instance (fedbus.failover).
    signers: frozenset[str] | None = None

    def signed_by_other(self, signer: str | None, sender: str) -> bool:
        """A valid signature of someone who may not send this."""
        if signer is None:
            return False
        return signer not in self.signers if self.signers is not None else signer != sender

    def limits_now(self) -> Limits:
        return self.limits() if callable(self.limits) else self.limits


@dataclass(frozen=True, slots=True)
class Admitted:
    """A message that passed the door: its entry, envelope, sender and size on the wire."""

    entry: Entry
    env: Envelope
    sender: str
    topic: topics.ParsedTopic
    nbytes: int


class Door:
    """One service's front door: ``await door.open(msg)`` gives an ``Admitted`` or None
    (refused and counted)."""

    def __init__(self, job: str, node_id: str, *, rejections: Rejections | None = None,
                 seen: SeenIds | None = None, offload: Offload | None = None) -> None:
        self.job = job
        self.node_id = node_id
        #: How a large decode leaves the event loop (default: asyncio's worker threads; the
        #: store uses its own low-priority thread).
        self.offload: Offload = offload or asyncio.to_thread
        self.entries: list[Entry] = []
        self.rejections = rejections if rejections is not None else Rejections(node_id)
        self.seen = seen if seen is not None else SeenIds()

    @property
    def reject(self) -> Callable[..., None]:
        return self.rejections.reject

    def expect(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        return entry

    def entry_for(self, topic: str) -> Entry | None:
        for entry in self.entries:
            if topics.matches(entry.filter, topic):
                return entry
        return None

    async def open(self, msg: Message) -> Admitted | None:
        """Check and decode ``msg`` (a large one in a worker thread)."""
        found = self._route(msg)
        if found is None:
            return None
        entry, parsed = found
        limits = entry.limits_now()
        try:
            if is_big(msg.payload):  # a big frame, or a small one that inflates
                env = await self.offload(decode, msg.payload, limits)
            else:
                env = decode(msg.payload, limits)
        except CodecError as exc:
            self.reject(entry.label + exc.reason, exc.detail, sender=parsed.sender,
                        topic=msg.topic)
            return None
        return self._check(entry, parsed, env, len(msg.payload), msg.signer)

    def open_now(self, msg: Message) -> Admitted | None:
        """``open`` on the calling thread (a caller already off the event loop)."""
        found = self._route(msg)
        if found is None:
            return None
        entry, parsed = found
        try:
            env = decode(msg.payload, entry.limits_now())
        except CodecError as exc:
            self.reject(entry.label + exc.reason, exc.detail, sender=parsed.sender,
                        topic=msg.topic)
            return None
        return self._check(entry, parsed, env, len(msg.payload), msg.signer)

    def screen(self, msg: Message) -> Message | None:
        """The checks that need no decoding, made as ``msg`` arrives (a ``fedbus.bus.Screen``):
        a message this door would refuse by its topic, sender or signer never waits in the
        service's queue, so a flood of them cannot crowd out real ones. A topic no entry
        names passes on, to be checked by whoever reads it."""
        if self.entry_for(msg.topic) is None:
            return msg
        return msg if self._route(msg) is not None else None

    def route(self, msg: Message) -> tuple[Entry, topics.ParsedTopic] | None:
        """The entry ``msg`` comes in by (refused and counted when none)."""
        return self._route(msg)

    def _route(self, msg: Message) -> tuple[Entry, topics.ParsedTopic] | None:
        try:
            parsed = topics.parse(msg.topic)
        except FedbusError as exc:
            self.reject("bad_topic", str(exc), topic=msg.topic)
            return None
        if parsed.job != self.job:
            self.reject("bad_topic", f"job {parsed.job!r}", topic=msg.topic)
            return None
        entry = self.entry_for(msg.topic)
        if entry is None:
            self.reject("unexpected_topic", "not a topic this node listens to",
                        topic=msg.topic)
            return None
        if entry.topic_sender and entry.senders is not None \
                and parsed.sender not in entry.senders:
            if entry.others_ignored:
                return None
            # refused before a byte is decoded: the topic says who published it
            self.reject(entry.label + "unknown_sender",
                        "not a sender the wiring names for this topic",
                        sender=parsed.sender, topic=msg.topic)
            return None
        signer = msg.signer
        if entry.topic_sender or entry.signers is not None:
            wrong = entry.signed_by_other(signer, parsed.sender)
        else:  # the envelope names the sender: for now, the signer must be one who may send
            wrong = signer is not None and entry.senders is not None \
                and signer not in entry.senders
        if wrong:
            # a valid signature of someone who may not send this: refused before decoding, so
            # a compression bomb signed with any job key costs nothing (_check repeats it)
            self.reject(entry.label + "wrong_signer", f"signed by {signer!r}",
                        sender=parsed.sender, topic=msg.topic)
            return None
        return entry, parsed

    def _check(self, entry: Entry, parsed: topics.ParsedTopic, env: Envelope,
               nbytes: int, signer: str | None) -> Admitted | None:
        sender = parsed.sender if entry.topic_sender else env.sender
        where = {"sender": sender, "topic": entry.filter}
        if entry.signed_by_other(signer, sender):
            # a valid signature, of someone else: nobody speaks for a node it is not
            self.reject(entry.label + "wrong_signer", f"signed by {signer!r}", **where)
            return None
        if env.job != self.job:
            self.reject(entry.label + "wrong_job", f"job {env.job!r}", **where)
            return None
        if env.kind not in entry.kinds:
            self.reject(entry.label + "bad_kind", f"kind {env.kind!r}, expected "
                        f"{sorted(entry.kinds)}", **where)
            return None
        if entry.topic_sender and env.sender != sender:
            self.reject(entry.label + "spoofed_sender", f"envelope says {env.sender!r}",
                        **where)
            return None
        if not entry.topic_sender and entry.senders is not None \
                and env.sender not in entry.senders:
            self.reject(entry.label + "unknown_sender",
                        f"{env.sender!r} may not send {env.kind!r} here", **where)
            return None
        if entry.dedupe and not self.seen.add(env.msg_id):
            self.reject(entry.label + "duplicate", f"message {env.msg_id} seen before",
                        **where)
            return None
        return Admitted(entry, env, sender, parsed, nbytes)

    def first_time(self, adm: Admitted) -> bool:
        """For entries without ``dedupe``: True the first time its message id comes (else
        refused and counted as a duplicate)."""
        if self.seen.add(adm.env.msg_id):
            return True
        self.reject("duplicate", f"message {adm.env.msg_id} seen before", sender=adm.sender)
        return False


# --- the codec stages and tensor checks of an update ---------------------------------------


@dataclass(frozen=True, slots=True)
class CheckedUpdate:
    """An update's content after every check: the delta (``codec.update`` decoded; an int8
    one kept packed, dense when indexed: ``fedbus.compress.PackedDelta``),
    the strategy's extras, example count, L2 norm and finite metrics."""

    delta: Mapping[str, np.ndarray]
    aux: dict[str, np.ndarray]
    num_examples: int
    norm: float
    metrics: dict[str, float]


def check_update(env: Envelope, reference: Mapping[str, np.ndarray], *,
                 max_examples: int = 1 << 40, max_norm: float | None = None) -> CheckedUpdate:
    """Open an update's tensors as every consumer of updates must: its example count, its
    ``codec.update`` packing decoded against ``reference`` (the model it must match) and
    the delta checked (names, shapes, dtypes, finite, norm). Raises UpdateRejected."""
    n = checked_num_examples(env.meta, max_examples)
    sent, aux = split_tensors(env.tensors)
    delta = decode_update(sent, env.meta, reference)
    norm = check_update_tensors(reference, delta, max_norm)
    metrics = env.meta.get("metrics", {})
    return CheckedUpdate(delta, aux, n, norm,
                         finite_metrics(metrics) if isinstance(metrics, dict) else {})


def is_big(payload: bytes) -> bool:
    """Worth a worker thread: a big frame, or a small one that declares a big data region
    (already bounded by the limits, but inflating it still takes time)."""
    return len(payload) >= OFFLOAD_BYTES or peek_data_size(payload) >= OFFLOAD_BYTES


def finite_metrics(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """Numeric, finite metrics only: a NaN or a string must not reach a report or selector."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
