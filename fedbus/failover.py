"""One active instance per aggregator: a second instance waits as a standby and takes over
when the first one's presence goes offline (its last will fires the moment it dies).

The lease is the aggregator's retained presence on the broker: ``online`` means an instance
is active, and a starting instance that finds it waits. Only one connection can hold the
node's client id at a time (MQTT session takeover), so two instances never publish as the
node at once.

**Instances that start together.** With nothing active, every instance stands as a candidate
before it connects as the node: it says so on ``lease/<node>/<candidate>`` (a ticket: its
start time in nanoseconds, then random bits) every ``_ANNOUNCE_S`` for ``_SETTLE_S``, and
listens. One that hears a smaller ticket, or the node's presence going online, defers and
waits as a standby; one that hears neither becomes active, and goes on announcing until its
node is online, so a candidate that starts in between hears it. Tickets are totally ordered,
so two candidates that hear each other never both win: the one that started first does.
Before this, two instances started at the same instant both connected and took the session
from each other on every reconnect, for good (mosquitto 2.0.11 closes the replaced connection
without saying why, so a bus cannot tell a takeover from a network drop).

Announcements are not retained (a dead candidate leaves nothing behind); a candidate that
deferred and sees nobody come online within ``_DEFER_S`` stands again. On an anonymous
broker a forged announcement can delay an election (bounded by ``_DEFER_S`` a round), and a
forged ``offline`` can still wake a standby (it then takes the session; the active one
restores from the checkpointer when it is back): only authentication stops those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import structlog

from fedbus import topics
from fedbus.bus import Bus, Subscription
from fedbus.codec import Envelope, encode
from fedbus.connect import broker_settings, mqtt_bus, signed
from fedbus.credentials import node_credentials
from fedbus.door import Admitted, Door, Entry
from fedbus.errors import BusError, FedbusError
from fedbus.manifest import Manifest
from fedbus.wire import LEASE, PRESENCE

__all__ = ["JobAlreadyRunning", "await_leadership", "refuse_if_running", "stand_down"]

log = structlog.get_logger(__name__)

#: How long to wait for a retained presence (the probe sent behind it normally comes back in
#: milliseconds): none within this means nobody ever was active.
_RETAINED_WAIT_S = 5.0
#: How long a candidate listens for others before it becomes active.
_SETTLE_S = 1.0
#: How often a candidate (and the winner, until its node is online) announces itself.
_ANNOUNCE_S = 0.2
#: A candidate that deferred and sees nobody come online within this stands again.
_DEFER_S = 10.0
#: The winner announces itself until its node is online, at most this long.
_HOLD_S = 120.0

#: The winners' announcers, running on after ``await_leadership`` returned.
_holders: set[asyncio.Task[None]] = set()


async def await_leadership(m: Manifest, node: str, *, watch_as: str | None = None) -> float:
    """Return once this instance may be ``node``'s active one; the seconds spent waiting.

    ``watch_as``: the broker user the standby watches with (an operator, on a secured broker:
    the node's own identity would take the active instance's session).
    """
    assert m.broker is not None
    if watch_as is None and node_credentials(m, node).secured:
        # On a secured broker the client id is the user: watching with the node's own
        # identity would take the active instance's session. A standby needs its own user.
        log.info("standby_check_skipped", node=node,
                 detail="secured broker: pass --watch-as OPERATOR to run a standby")
        return 0.0
    candidate = "c" + os.urandom(6).hex()
    settings = broker_settings(m, node, login_as=watch_as,
                               client_id=watch_as or f"fedbus.{m.job}.{node}.{candidate}")
    # signing as the node (its instances share its key) and checking its signed presence
    watcher = signed(m, node, mqtt_bus(f"{node}-standby", settings))
    # the active instance's presence and the other candidates, through a front door
    door = Door(m.job, f"{node}-standby")
    door.expect(Entry(topics.presence(m.job, node), frozenset({PRESENCE}),
                      senders=frozenset({node}), dedupe=False))
    door.expect(Entry(topics.leases(m.job, node), frozenset({LEASE}), label="lease_",
                      dedupe=False, signers=frozenset({node})))
    election = _Election(watcher, door, m.job, node, candidate)
    started = time.monotonic()
    try:
        await watcher.__aenter__()
    except BusError as exc:
        log.warning("standby_check_failed", node=node, error=str(exc),
                    detail="could not watch for another active instance; starting anyway")
        return 0.0
    won = False
    try:
        sub = await watcher.subscribe(topics.presence(m.job, node), topics.leases(m.job, node),
                                      election.probe).__aenter__()
        election.sub = sub
        try:
            await election.wait_for_lead()
            won = True
        finally:
            if not won:
                await sub.__aexit__(None, None, None)
    finally:
        if not won:
            await watcher.__aexit__(None, None, None)
    task = asyncio.create_task(election.hold(), name=f"lease-{node}")
    _holders.add(task)
    task.add_done_callback(_holders.discard)
    waited = time.monotonic() - started
    if election.was_standby:
        log.warning("standby_taking_over", node=node, waited_s=round(waited, 3))
    return waited


async def stand_down() -> None:
    """Stop announcing a lead this process won (a probe that will not run the node)."""
    for task in list(_holders):
        task.cancel()
    for task in list(_holders):
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Election:
    """One instance's candidacy for ``node`` (see the module's doc)."""

    def __init__(self, bus: Bus, door: Door, job: str, node: str, candidate: str) -> None:
        self.bus = bus
        self.door = door
        self.node = node
        self.candidate = candidate
        self.ticket = f"{time.time_ns():020d}-{os.urandom(4).hex()}"
        self.topic = topics.lease(job, node, candidate)
        self.payload = encode(Envelope(kind=LEASE, job=job, sender=candidate, round=0,
                                       meta={"ticket": self.ticket}))
        #: Sent to ourselves: once it is back, the broker has delivered any retained presence.
        self.probe = topics.probe(job, candidate)
        self.sub: Subscription | None = None
        self.online = False
        self.was_standby = False

    async def _next(self, timeout: float) -> str | None:
        """The next message's news: "online", "offline", "smaller" (a candidate that wins
        over us), or None (nothing, or nothing that matters)."""
        assert self.sub is not None
        msg = await self.sub.get(timeout=max(timeout, 0.0))
        if msg.topic == self.probe:
            return "probe"
        adm = self.door.open_now(msg)
        if adm is None:
            return None
        if adm.env.kind == PRESENCE:
            self.online = _status(adm) == "online"
            return "online" if self.online else "offline"
        ticket = adm.env.meta.get("ticket")
        if adm.sender != self.candidate and isinstance(ticket, str) and len(ticket) <= 64 \
                and ticket < self.ticket:
            return "smaller"
        return None

    async def wait_for_lead(self) -> None:
        loop = asyncio.get_running_loop()
        # the retained presence, if any: it comes before our probe does (no clock needed)
        await self.bus.publish(self.probe, b"probe")
        end = loop.time() + _RETAINED_WAIT_S
        with contextlib.suppress(TimeoutError):
            while await self._next(end - loop.time()) != "probe":
                pass
        while True:
            if self.online:
                self.was_standby = True
                log.warning("standby_waiting", node=self.node,
                            detail="another instance is active; taking over when it goes "
                                   "offline")
                while self.online:
                    await self._next(3600.0)
            if await self._stand(loop):
                log.info("leader_elected", node=self.node, ticket=self.ticket)
                return
            if not self.online:  # deferred to a smaller ticket: wait for it to come online
                log.info("candidate_deferred", node=self.node, ticket=self.ticket)
                end = loop.time() + _DEFER_S
                with contextlib.suppress(TimeoutError):
                    while not self.online:
                        await self._next(end - loop.time())

    async def _stand(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Announce ourselves for ``_SETTLE_S``: True when nobody beat us."""
        end = loop.time() + _SETTLE_S
        announce = loop.time()
        while (now := loop.time()) < end:
            if now >= announce:
                try:
                    await self.bus.publish(self.topic, self.payload)
                except BusError as exc:  # e.g. a broker user with no right to announce
                    log.warning("candidate_cannot_announce", node=self.node, error=str(exc),
                                detail="starting without an election")
                    return True
                announce = now + _ANNOUNCE_S
            try:
                news = await self._next(min(announce, end) - now)
            except TimeoutError:
                continue
            if news in ("online", "smaller"):
                return False
        return True

    async def hold(self) -> None:
        """Go on announcing until our node is online (then close the watcher)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + _HOLD_S
        assert self.sub is not None
        try:
            announce = loop.time()
            while not self.online and (now := loop.time()) < end:
                if now >= announce:
                    await self.bus.publish(self.topic, self.payload)
                    announce = now + _ANNOUNCE_S
                with contextlib.suppress(TimeoutError):
                    await self._next(min(announce, end) - now)
        except BusError:
            pass  # the node comes online all the same; a candidate waits at most _DEFER_S
        finally:
            with contextlib.suppress(BusError):
                await self.sub.__aexit__(None, None, None)
                await self.bus.__aexit__(None, None, None)


class JobAlreadyRunning(FedbusError):
    """A ``fedbus run`` found its job's aggregator active on the broker it was to use."""

    def __init__(self, job: str, node: str, endpoint: str) -> None:
        super().__init__(
            f"job {job!r} is already running on {endpoint}: its aggregator {node!r} is online "
            "(another `fedbus run`, or `fedbus serve --node " + node + "`); stop that one "
            "first, or give this run another job name")
        self.job = job
        self.node = node
        self.endpoint = endpoint


async def refuse_if_running(m: Manifest, node: str) -> None:
    """Raise ``JobAlreadyRunning`` when ``node``'s retained presence says it is online.

    Read with a throwaway client that then sends itself a probe: once the probe is back,
    the broker has delivered the retained presence if it holds one, so no waiting on a clock.
    On a secured broker nothing is checked (every user there is a node or an operator, and
    logging in as the node would take the active instance's session); an unreachable broker
    is left to the run itself to report.
    """
    assert m.broker is not None
    if node_credentials(m, node).secured:
        return
    me = f"fedbus.{m.job}.{node}.check.{os.getpid()}"
    bus = signed(m, node, mqtt_bus(me, broker_settings(m, node, client_id=me)))
    door = Door(m.job, me)
    door.expect(Entry(topics.presence(m.job, node), frozenset({PRESENCE}),
                      senders=frozenset({node}), dedupe=False))
    probe = topics.probe(m.job, me)
    status = None
    try:
        await bus.__aenter__()
    except BusError:
        return
    try:
        async with bus.subscribe(topics.presence(m.job, node), probe) as sub:
            await bus.publish(probe, b"probe")
            async with asyncio.timeout(60):  # only a broker that stops answering gets here
                while (msg := await sub.get()).topic != probe:
                    status = _status(door.open_now(msg)) or status
    except (BusError, TimeoutError):
        return
    finally:
        await bus.__aexit__(None, None, None)
    if status == "online":
        raise JobAlreadyRunning(m.job, node, f"{m.broker.host}:{m.broker.port}")


def _status(adm: Admitted | None) -> str | None:
    meta = adm.env.meta if adm is not None else {}
    status = meta.get("status") if isinstance(meta, dict) else None
    return status if isinstance(status, str) else None
