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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Message
from fedbus.codec import Envelope, Limits
from fedbus.door import Admitted, Door, Entry, check_update, is_big
from fedbus.errors import UpdateRejected
from fedbus.wire import PRESENCE, READY, UPDATE
from strategies import ClientUpdate, StrategyError

__all__ = ["Intake", "IntakeHost", "IntakeSettings"]

log = structlog.get_logger(__name__)

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
    subscription (``update/<me>/+`` and ``presence/+``), through the service's front door."""

    def __init__(self, host: IntakeHost, settings: IntakeSettings) -> None:
        self.host = host
        self.settings = settings
        s = settings
        self.door = Door(s.job, s.node_id)
        self.rejections = self.door.rejections
        self._updates = self.door.expect(Entry(
            topics.updates_for(s.job, s.node_id), frozenset({UPDATE, READY}),
            senders=s.children, limits=lambda: self.settings.limits))
        self._presence = self.door.expect(Entry(
            topics.presence_all(s.job), frozenset({PRESENCE}), senders=s.children,
            label="presence_", others_ignored=True))
        #: Children currently believed online (presence, or still publishing).
        self.online: set[str] = set()
        self._log = log.bind(node=settings.node_id, job=settings.job)

    @property
    def reject(self) -> Any:
        return self.door.reject

    @property
    def seen(self) -> Any:
        return self.door.seen

    async def handle(self, msg: Message) -> None:
        route = self.door.route(msg)
        if route is None:
            return
        if route[0] is self._presence:
            adm = self.door.open_now(msg)  # small: PRESENCE_LIMITS
            if adm is not None:
                self._on_presence(adm)
            return
        if is_big(msg.payload):
            await asyncio.to_thread(self._on_update, msg)
        else:
            self._on_update(msg)

    # -- presence ------------------------------------------------------------------------

    def _on_presence(self, adm: Admitted) -> None:
        node, status = adm.sender, adm.env.meta.get("status")
        if status not in ("online", "offline"):
            self.reject("bad_presence", f"status={status!r}", sender=node)
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

    def _on_update(self, msg: Message) -> None:
        adm = self.door.open_now(msg)  # already off the event loop when large
        if adm is None:
            return
        env, sender = adm.env, adm.sender
        if env.kind == READY:
            if self.host.expects_ready(sender, env.round):
                self._still_alive(sender)
                self.host.ready(sender)
            else:
                self.reject("unexpected_ready", f"ready for round {env.round}", sender=sender)
            return
        try:
            self._fold(env, sender, adm.nbytes)
        finally:
            self.host.upload_done(sender)  # its upload is in, good or bad: the slot is free

    def _fold(self, env: Envelope, sender: str, nbytes: int) -> None:
        s = self.settings
        try:
            staleness = self.host.admit(env, sender)
            checked = check_update(env, self.host.weights, max_examples=s.max_examples,
                                   max_norm=s.max_norm)
            update = ClientUpdate(
                sender=sender, delta=checked.delta, num_examples=checked.num_examples,
                base_round=env.round, staleness=staleness, aux=checked.aux,
                metrics=checked.metrics,
            )
            self.host.fold(update, env)
        except UpdateRejected as exc:
            self.reject(exc.reason, exc.detail, sender=sender, round=env.round)
            return
        except StrategyError as exc:
            self.reject("strategy_rejected", str(exc), sender=sender, round=env.round)
            return
        self._still_alive(sender)
        self.host.folded(update, env, checked.norm, nbytes)
        self._log.debug("update_accepted", peer=sender, round=env.round,
                        examples=checked.num_examples)
