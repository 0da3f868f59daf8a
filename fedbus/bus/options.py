"""How an ``MqttBus`` connects and moves bytes: one object instead of two dozen keyword
arguments, built from the manifest in one place (``fedbus.connect``). No aiomqtt here: a
process that never speaks MQTT does not load it."""

from __future__ import annotations

from dataclasses import dataclass

from fedbus.bus._chunking import ChunkLimits
from fedbus.bus._repair import RepairLimits

__all__ = ["MqttOptions"]


@dataclass(frozen=True, slots=True)
class MqttOptions:
    """How an ``MqttBus`` connects and moves bytes."""

    #: Payloads above this travel in chunks (brokers cap packets; 1-4 MB is fastest).
    chunk_bytes: int = 1_000_000
    #: The biggest message reassembled (``limits`` wins when given).
    max_message_bytes: int = 256 * 1024 * 1024
    limits: ChunkLimits | None = None
    #: MQTT keepalive, seconds: the manifest's ``broker.keepalive_s`` default too.
    keepalive: int = 30
    session_expiry_s: int = 3600
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 60.0
    max_inflight: int = 200
    #: Unacknowledged QoS 1 messages the broker may have on their way to us (MQTT 5 Receive
    #: Maximum); with manual acks it bounds the client's incoming queue.
    receive_maximum: int = 64
    repair_limits: RepairLimits | None = None
