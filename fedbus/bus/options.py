"""How an ``MqttBus`` connects and moves bytes: one object instead of two dozen keyword
arguments, built from the manifest in one place (``fedbus.connect``). No aiomqtt here: a
process that never speaks MQTT does not load it."""

from __future__ import annotations

from dataclasses import dataclass

from fedbus.bus._chunking import ChunkLimits
from fedbus.bus._repair import RepairLimits

__all__ = ["PACKET_HEADROOM", "MqttOptions"]

#: Bytes a packet may carry beyond one chunk: the MQTT fixed and variable headers, the
#: topic, the chunk frame's header and a signature trailer (all far smaller).
PACKET_HEADROOM = 64 * 1024


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
    #: One connection attempt's timeout; each retry's doubles, up to ``connect_wait_s``.
    connect_timeout_s: float = 10.0
    #: How long opening the bus waits for its first connection, retrying meanwhile (None:
    #: ``connect_timeout_s``, one attempt's worth).
    connect_wait_s: float | None = None
    publish_timeout_s: float = 60.0
    max_inflight: int = 200
    #: Unacknowledged QoS 1 messages the broker may have on their way to us (MQTT 5 Receive
    #: Maximum); with manual acks it bounds the client's incoming queue.
    receive_maximum: int = 64
    repair_limits: RepairLimits | None = None
    #: The largest MQTT packet this client accepts (MQTT 5 Maximum Packet Size, sent in
    #: CONNECT): the broker drops anything larger before it is sent, so a forged 64 MiB
    #: publish never reaches the process. ``None``: one chunk plus headroom for the topic,
    #: the chunk header and a signature (every payload above ``chunk_bytes`` is chunked;
    #: only small retained presence travels whole).
    max_packet_bytes: int | None = None

    @property
    def max_packet(self) -> int:
        """The Maximum Packet Size to declare, in bytes (MQTT caps it at 2**28 - 1)."""
        size = self.max_packet_bytes
        if size is None:
            size = self.chunk_bytes + PACKET_HEADROOM
        return max(1024, min(size, (1 << 28) - 1))
