"""The attacks of ``benchmarks.bench_fuzz`` beyond the fuzzer: a flood of tiny forgeries on
every topic a job listens to (published by ``benchmarks.flood`` in its own process) and one
64 MiB publish; and what they share with the harness (the broker's login, the progress file
the job's evaluations are paced by). ``run`` is a ``bench_fuzz.Run``: what an attack sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks.bench_rounds import REPO
from fedbus import topics
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.signing import Signer, read_key

__all__ = ["HUGE_BYTES", "Broker", "flood", "flood_plan", "huge", "under_way",
           "write_progress"]


@dataclass
class Broker:
    """The broker of one run, and how a client logs in to it (None: anonymous)."""

    host: str
    port: int
    stop: Any
    password: Any = None  # user -> password on a secured broker

    def login(self, user: str) -> dict[str, Any]:
        if self.password is None:
            return {}
        return {"username": user, "password": self.password(user)}


def write_progress(path: Path, sent: int, total: int) -> None:
    """Keep "sent total" in ``path``, replaced whole: what the gated evaluations read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{sent} {total}\n")
    tmp.replace(path)


async def under_way(m: Any, broker: Broker) -> None:
    """Return once the job's first order or round report goes by (what an attacker who
    reads the job waits for)."""
    readable = ([f"fedbus/v1/{m.job}/#"] if broker.password is None
                else [topics.metrics_all(m.job), topics.presence_all(m.job)])
    async with MqttBus("mallory-eye", broker.host, broker.port, client_id="mallory-eye",
                       options=MqttOptions(**broker.login("mallory-eye"))) as bus, \
            bus.subscribe(*readable) as spy:
        while True:
            msg = await spy.get(timeout=300)  # a bound on a hang; generous under load
            if msg.topic in (topics.model(m.job, m.aggregator.id),
                             topics.metrics(m.job, m.aggregator.id)):
                return


def flood_plan(m: Any, keys: Path | None, seed: int = 0) -> list[tuple[str, bytes]]:
    """Tiny forgeries for every topic some node listens to: garbage, an unsigned envelope
    naming the topic's node, and (with ``keys``) that envelope signed with the key of another
    real node of the job: each costs a receiver a signature check before it is refused."""
    import random

    from fedbus.codec import Envelope, encode
    from fedbus.fuzz import listened_topics
    from fedbus.wire import READY, presence

    rng = random.Random(seed)
    nodes = [n.id for n in m.nodes]
    plan: list[tuple[str, bytes]] = []
    for topic in listened_topics(m, ("stranger-0",)):
        named = topic.rsplit("/", 1)[1]
        if "/presence/" in topic:
            env = presence(m.job, named, "trainer", "offline")
        else:
            env = Envelope(kind=READY, job=m.job, sender=named, round=1, meta={"bytes": 1})
        payload = encode(env)
        plan += [(topic, rng.randbytes(16)), (topic, payload)]
        if keys is not None:
            thief = rng.choice([n for n in nodes if n != named])
            plan.append((topic, Signer(thief, read_key(keys / f"{thief}.key")).sign(payload)))
    rng.shuffle(plan)
    return plan


async def flood(m: Any, broker: Broker, messages: int, seed: int, run: Any, t0: float,
                 progress: Path, *, flood_s: float, keys: Path | None, **_: Any) -> None:
    """``benchmarks.flood`` in its own process, once the job is under way."""
    import os

    from benchmarks.flood import write_plan

    await under_way(m, broker)
    plan = progress.with_name("flood-plan.msgpack")
    write_plan(plan, flood_plan(m, keys, seed))
    report = progress.with_name("flood.json")
    login = broker.login("mallory")
    env = {**os.environ, "FLOOD_PASSWORD": login.get("password", "")}
    cmd = [sys.executable, "-m", "benchmarks.flood", broker.host, str(broker.port), str(plan),
           "--seconds", str(flood_s), "--max", str(messages), "--progress", str(progress),
           "--report", str(report)]
    if login:
        cmd += ["--username", login["username"], "--password-env", "FLOOD_PASSWORD"]
    started = time.monotonic() - t0
    proc = _popen(cmd, env)
    try:
        await asyncio.to_thread(proc.wait, flood_s + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    data = json.loads(report.read_text())
    run.sent = {"flood": int(data["sent"])}
    run.flood_rate = float(data["rate"])
    run.flood = (started, time.monotonic() - t0)


def _popen(cmd: list[str], env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)


#: What ``--attack huge`` publishes: the issue's one message.
HUGE_BYTES = 64 << 20


async def huge(m: Any, broker: Broker, messages: int, seed: int, run: Any, t0: float,
                progress: Path, *, keys: Path | None, **_: Any) -> None:
    """One 64 MiB publish on t0's update topic, unsigned; then, with ``keys``, the same
    signed with t0's own key (a trainer turned hostile: a valid signature of the sender)."""
    import os

    await under_way(m, broker)
    topic = topics.update(m.job, m.aggregator.id, "t0")
    payload = os.urandom(HUGE_BYTES)
    payloads = [payload]
    if keys is not None:
        payloads.append(Signer("t0", read_key(keys / "t0.key")).sign(payload))
    started = time.monotonic() - t0
    async with aiomqtt.Client(broker.host, broker.port, identifier="mallory",
                              logger=logging.getLogger("fedbus.fuzz.attacker"),
                              protocol=aiomqtt.ProtocolVersion.V5,
                              **broker.login("mallory")) as raw:
        for p in payloads:
            await raw.publish(topic, p, qos=1)
    run.sent = {"huge": len(payloads)}
    run.flood = (started, time.monotonic() - t0)
    write_progress(progress, 1, 1)
