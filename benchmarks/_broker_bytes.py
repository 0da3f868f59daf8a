"""A mosquitto's own byte counters, for the benchmarks that measure broker traffic."""

from __future__ import annotations

import asyncio

import aiomqtt

from fedbus.broker import MosquittoProcess

__all__ = ["broker_bytes"]


async def broker_bytes(proc: MosquittoProcess, client_id: str) -> tuple[int, int]:
    """(received, sent) bytes since the broker started, from its retained ``$SYS`` topics
    (every byte of every MQTT packet, bridges included). The broker must publish ``$SYS``
    often (``sys_interval 1``) for the counters to be fresh."""
    want = {"$SYS/broker/bytes/received": -1, "$SYS/broker/bytes/sent": -1}
    async with asyncio.timeout(10), aiomqtt.Client(proc.host, proc.port,
                                                   identifier=client_id) as client:
        for topic in want:
            await client.subscribe(topic)
        async for message in client.messages:
            want[str(message.topic)] = int(bytes(message.payload))  # type: ignore[arg-type]
            if all(v >= 0 for v in want.values()):
                break
    return want["$SYS/broker/bytes/received"], want["$SYS/broker/bytes/sent"]
