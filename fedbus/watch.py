"""``fedbus watch``: print a running job's rounds from the bus, and never hang silently.

The aggregator's presence is retained on the broker, so a watcher learns at once whether the
job is running; without a round report for ``timeout`` seconds it stops and says why.
"""

from __future__ import annotations

import sys
import time

import structlog

from fedbus import topics
from fedbus.codec import decode
from fedbus.connect import make_bus
from fedbus.credentials import observer_id
from fedbus.errors import CodecError, FedbusError, ManifestError
from fedbus.manifest import Manifest, NodeSpec
from fedbus.progress import format_round

__all__ = ["WatchTimeout", "watch"]

log = structlog.get_logger("fedbus.watch")


class WatchTimeout(FedbusError):
    """No round report arrived within the watch timeout."""


async def watch(m: Manifest, timeout_s: float, *, user: str | None = None) -> int:
    if m.broker is None:
        raise ManifestError(m.source, "broker", "`fedbus watch` needs --broker HOST:PORT")
    # on a secured broker the watcher logs in as an operator (`fedbus acl --operator`)
    watcher = NodeSpec(id=observer_id(m, user, "watch"), role="trainer")
    agg = m.aggregator.id
    metrics_topic = topics.metrics(m.job, agg)
    presence_topic = topics.presence(m.job, agg)
    endpoint = f"{m.broker.host}:{m.broker.port}"
    status = "never seen"
    deadline = time.monotonic() + timeout_s
    async with make_bus(m, watcher, interactive=True) as bus, \
            bus.subscribe(metrics_topic, presence_topic) as sub:
        log.info("watch_started", job=m.job, node=agg)
        while True:
            left = deadline - time.monotonic()
            try:
                msg = await sub.get(timeout=max(left, 0.0))
            except TimeoutError:
                raise WatchTimeout(
                    f"no round report from job {m.job!r} on {endpoint} in {timeout_s:g}s; its "
                    f"aggregator {agg!r} is {status}: the job has ended or not started. Start "
                    "it, or wait longer with --timeout SECONDS") from None
            try:
                env = decode(msg.payload)
            except CodecError as exc:
                log.warning("message_rejected", reason=exc.reason, topic=msg.topic)
                continue
            if msg.topic == presence_topic:
                status = str(env.meta.get("status", "unknown"))
                if status != "online":
                    print(f"fedbus watch: job {m.job!r}: aggregator {agg} is {status} (the job "
                          f"is not running); waiting up to {timeout_s:g}s for it",
                          file=sys.stderr, flush=True)
                continue
            deadline = time.monotonic() + timeout_s
            print(format_round(dict(env.meta), m.rounds), flush=True)
            if env.meta.get("round") == m.rounds:
                return 0
