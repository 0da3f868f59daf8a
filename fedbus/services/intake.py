"""The update intake: one pipeline for every aggregating service (aggregator, asynchronous
aggregator, and the relays and store that build on them).

    topic -> sender -> decode (limits from the model) -> checks -> dedupe -> gate -> fold

Each stage either passes the message on or rejects it: counted by reason, logged with its
sender, never raised into the service. A service says only what differs through
``IntakeHost``: whether a ``ready`` is expected, whether an update is admissible now (its
round or version bookkeeping), and how to fold it. Presence goes through the same door.

What the intake trusts: the topic's sender level, because the broker's ACL ties it to the
publisher's credentials (``fedbus acl``); on an anonymous broker nothing can be trusted and
the checks only bound the damage (see docs/architecture.md, "What each service trusts").
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Message
from fedbus.codec import Envelope, Limits, decode, peek_data_size
from fedbus.compress import decode_update
from fedbus.errors import CodecError, FedbusError, UpdateRejected
from fedbus.services._wire import PRESENCE, READY, UPDATE, split_tensors
from strategies import ClientUpdate, StrategyError

__all__ = [
    "OFFLOAD_BYTES",
    "Intake",
    "IntakeHost",
    "IntakeSettings",
    "Rejections",
    "SeenIds",
    "check_update_tensors",
    "checked_num_examples",
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
    for name, ref in reference.items():
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
    """Counts rejected messages by reason and logs each one with its sender.

    ``since_report()`` gives what was rejected since the last call, so rejections that land
    between two rounds show up in the next round's report instead of nowhere.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def reject(self, reason: str, detail: str, **context: Any) -> None:
        self.counts[reason] += 1
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


@dataclass(frozen=True, slots=True)
class IntakeSettings:
    job: str
    node_id: str
    #: The nodes whose updates this service folds (the manifest's children of this node).
    children: frozenset[str]
    #: Decode limits for one update: derived from the model by ``model_limits``.
    limits: Limits
    max_examples: int = 1 << 40
    #: Optional L2 bound on an update's delta (manifest ``round.max_update_norm``).
    max_norm: float | None = None


class IntakeHost(Protocol):
    """What a service tells the intake: the differences between aggregating services."""

    @property
    def weights(self) -> Mapping[str, np.ndarray]:
        """The model updates must match (names, shapes, dtypes)."""
        ...

    def expects_ready(self, sender: str, number: int) -> bool:
        """Is a ``ready`` from ``sender`` for round/version ``number`` expected now?"""
        ...

    def admit(self, env: Envelope, sender: str) -> int:
        """Round/version bookkeeping before the tensors are looked at: return the update's
        staleness, or raise ``UpdateRejected`` (stale, not selected, duplicate, ...)."""
        ...

    def fold(self, update: ClientUpdate, env: Envelope) -> None:
        """Give a checked update to the strategy (may raise ``StrategyError``)."""
        ...

    def folded(self, update: ClientUpdate, env: Envelope, norm: float, nbytes: int) -> None:
        """``update`` (``nbytes`` on the wire, L2 norm ``norm``) was folded: still in the
        intake's worker thread, with the decoded delta at hand (a store's sketch of it)."""
        ...

    def node_online(self, node: str) -> None: ...

    def node_offline(self, node: str) -> None: ...

    def upload_done(self, node: str) -> None:
        """``node``'s upload came in (good or bad): its upload slot is free."""
        ...

    def ready(self, node: str) -> None:
        """``node`` has a large update waiting: queue it for an upload slot."""
        ...


class Intake:
    """The pipeline. ``await intake.handle(msg)`` for every message on the service's
    subscription (``update/<me>/+`` and ``presence/+``)."""

    def __init__(self, host: IntakeHost, settings: IntakeSettings) -> None:
        self.host = host
        self.settings = settings
        self.rejections = Rejections(settings.node_id)
        self.seen = SeenIds()
        #: Children currently believed online (presence, or still publishing).
        self.online: set[str] = set()
        self._presence_limits = Limits(max_frame_bytes=64 << 10, max_header_bytes=64 << 10,
                                       max_decompressed_bytes=0, max_tensors=0)
        self._log = log.bind(node=settings.node_id, job=settings.job)

    @property
    def reject(self) -> Any:
        return self.rejections.reject

    async def handle(self, msg: Message) -> None:
        try:
            parsed = topics.parse(msg.topic)
        except FedbusError as exc:
            self.reject("bad_topic", str(exc), topic=msg.topic)
            return
        sender = parsed.sender
        if parsed.job != self.settings.job:
            self.reject("bad_topic", f"job {parsed.job!r}", topic=msg.topic)
            return
        if parsed.channel == "presence":
            if sender in self.settings.children:
                self._on_presence(msg, sender)
            return  # other nodes' presence (watchers, stores): not ours to judge
        if parsed.channel != "update" or parsed.levels[0] != self.settings.node_id:
            self.reject("bad_topic", "not an update addressed to this node", topic=msg.topic)
            return
        if sender not in self.settings.children:
            self.reject("unknown_sender", "not a child of this node in the manifest",
                        sender=sender)
            return
        if is_big(msg.payload):
            await asyncio.to_thread(self._on_update, msg.payload, sender)
        else:
            self._on_update(msg.payload, sender)

    # -- presence ------------------------------------------------------------------------

    def _on_presence(self, msg: Message, node: str) -> None:
        try:
            env = decode(msg.payload, self._presence_limits)
        except CodecError as exc:
            self.reject(f"presence_{exc.reason}", exc.detail, sender=node)
            return
        status = env.meta.get("status")
        if (env.kind != PRESENCE or env.sender != node or env.job != self.settings.job
                or status not in ("online", "offline")):
            self.reject("bad_presence", f"kind={env.kind} sender={env.sender} status={status!r}",
                        sender=node)
            return
        if status == "online":
            if node not in self.online:
                self._log.info("node_joined", peer=node)
                self.online.add(node)
                self.host.node_online(node)
        elif node in self.online:
            self.online.discard(node)
            self.host.node_offline(node)

    def _still_alive(self, node: str) -> None:
        """An authentic message from a node reported offline: it is alive after all (a
        forged or stale offline, or a will that crossed a reconnect)."""
        if node not in self.online:
            self._log.warning("node_rejoined", peer=node, detail="published while offline")
            self.online.add(node)
            self.host.node_online(node)

    # -- updates ---------------------------------------------------------------------------

    def _on_update(self, payload: bytes, sender: str) -> None:
        env = self._open(payload, sender)
        if env is None:
            return
        if env.kind == READY:
            if self.host.expects_ready(sender, env.round):
                self._still_alive(sender)
                self.host.ready(sender)
            else:
                self.reject("unexpected_ready", f"ready for round {env.round}", sender=sender)
            return
        try:
            self._fold(env, sender, len(payload))
        finally:
            self.host.upload_done(sender)  # its upload is in, good or bad: the slot is free

    def _open(self, payload: bytes, sender: str) -> Envelope | None:
        """Decode within the model-derived limits; check kind, job, sender and message id."""
        s = self.settings
        try:
            env = decode(payload, s.limits)
        except CodecError as exc:
            self.reject(exc.reason, exc.detail, sender=sender)
            return None
        if env.kind not in (UPDATE, READY) or env.job != s.job:
            self.reject("bad_kind", f"kind={env.kind!r} job={env.job!r}", sender=sender)
            return None
        if env.sender != sender:
            self.reject("spoofed_sender", f"envelope says {env.sender!r}", sender=sender)
            return None
        if not self.seen.add(env.msg_id):
            self.reject("duplicate", f"message {env.msg_id} seen before", sender=sender)
            return None
        return env

    def _fold(self, env: Envelope, sender: str, nbytes: int) -> None:
        s = self.settings
        try:
            staleness = self.host.admit(env, sender)
            n = checked_num_examples(env.meta, s.max_examples)
            delta, aux = split_tensors(env.tensors)
            delta = decode_update(delta, env.meta, self.host.weights)  # codec.update modes
            norm = check_update_tensors(self.host.weights, delta, s.max_norm)
            metrics = env.meta.get("metrics", {})
            update = ClientUpdate(
                sender=sender, delta=delta, num_examples=n, base_round=env.round,
                staleness=staleness, aux=aux,
                metrics=_finite_metrics(metrics) if isinstance(metrics, dict) else {},
            )
            self.host.fold(update, env)
        except UpdateRejected as exc:
            self.reject(exc.reason, exc.detail, sender=sender, round=env.round)
            return
        except StrategyError as exc:
            self.reject("strategy_rejected", str(exc), sender=sender, round=env.round)
            return
        self._still_alive(sender)
        self.host.folded(update, env, norm, nbytes)
        self._log.debug("update_accepted", peer=sender, round=env.round, examples=n)


def is_big(payload: bytes) -> bool:
    """Worth a worker thread: a big frame, or a small one that declares a big data region
    (already bounded by the limits, but inflating it still takes time)."""
    return len(payload) >= OFFLOAD_BYTES or peek_data_size(payload) >= OFFLOAD_BYTES


def _finite_metrics(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """Numeric, finite metrics only: a NaN or a string must not reach a report or selector."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
