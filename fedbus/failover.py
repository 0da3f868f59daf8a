"""One active instance per aggregator: a second instance waits as a standby and takes over
when the first one's presence goes offline (its last will fires the moment it dies).

The lease is the aggregator's retained presence on the broker: ``online`` means an instance
is active, and a starting instance that finds it waits. Only one connection can hold the
node's client id at a time (MQTT session takeover), so two instances never publish as the
node at once. Not covered: two instances started at the same instant with nothing active,
or a forged ``offline`` on an anonymous broker — both connect and take the session from each
other on every reconnect (mosquitto 2.0.11 closes the replaced connection without saying why,
so a bus cannot tell a takeover from a network drop). The one that takes over restores from
the checkpointer and continues at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import structlog

from fedbus import topics
from fedbus.connect import broker_settings, mqtt_bus
from fedbus.credentials import node_credentials
from fedbus.door import Admitted, Door, Entry
from fedbus.errors import BusError, FedbusError
from fedbus.manifest import Manifest
from fedbus.wire import PRESENCE

__all__ = ["JobAlreadyRunning", "await_leadership", "refuse_if_running"]

log = structlog.get_logger(__name__)

#: How long to wait for a retained presence: none within this means nobody ever was active.
_RETAINED_WAIT_S = 1.0


async def await_leadership(m: Manifest, node: str, *, watch_as: str | None = None) -> float:
    """Return once no other instance of ``node`` is active; the seconds spent waiting.

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
    settings = broker_settings(m, node, login_as=watch_as,
                               client_id=watch_as or
                               f"fedbus.{m.job}.{node}.standby.{os.getpid()}")
    watcher = mqtt_bus(f"{node}-standby", settings)
    # the active instance's presence, through a front door: from that node, small
    door = Door(m.job, f"{node}-standby")
    door.expect(Entry(topics.presence(m.job, node), frozenset({PRESENCE}),
                      senders=frozenset({node}), dedupe=False))
    started = time.monotonic()
    try:
        await watcher.__aenter__()
    except BusError as exc:
        log.warning("standby_check_failed", node=node, error=str(exc),
                    detail="could not watch for another active instance; starting anyway")
        return 0.0
    try:
        async with watcher.subscribe(topics.presence(m.job, node)) as sub:
            status = None
            with contextlib.suppress(TimeoutError):
                status = _status(door.open_now(await sub.get(timeout=_RETAINED_WAIT_S)))
            if status == "online":
                log.warning("standby_waiting", node=node,
                            detail="another instance is active; taking over when it goes offline")
            while status == "online":
                adm = door.open_now(await sub.get())
                if adm is not None:
                    status = _status(adm)

    finally:
        await watcher.__aexit__(None, None, None)
    waited = time.monotonic() - started
    if waited > _RETAINED_WAIT_S + 0.5:
        log.warning("standby_taking_over", node=node, waited_s=round(waited, 3))
    return waited


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
    bus = mqtt_bus(me, broker_settings(m, node, client_id=me))
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
