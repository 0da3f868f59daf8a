"""aiomqtt's client as the MQTT bus uses it (kept honest about PUBACK reason codes, set up
for manual acks and the single-copy receive path), and small helpers of the connection
loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, cast

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbus.bus import _paho_fast
from fedbus.bus._base import Will
from fedbus.bus._chunking import HEADER
from fedbus.bus.options import MqttOptions
from fedbus.errors import BrokerLimitError, PublishDenied

__all__ = [
    "CheckedClient",
    "Connection",
    "abort_stalled",
    "in_flight",
    "lower_inflight",
    "make_client",
    "packet_size_problem",
    "properties",
]

_paho_log = logging.getLogger("fedbus.bus.mqtt.paho")
log = structlog.get_logger("fedbus.bus.mqtt")
# paho's Properties constructor is unannotated; pin its type once here.
properties = cast(Callable[[int], Properties], Properties)
# CONNACK reason codes that retrying cannot fix: bad id, bad credentials, not authorized, banned.
_FATAL_CONNACK: Final = frozenset({0x85, 0x86, 0x87, 0x8A, 0x8C})
# The packet ids of the publishes made by the current task: how a PUBACK reason code (which
# aiomqtt drops) finds its way back to the ``publish`` call that sent the message.
_SENT_MIDS: ContextVar[list[int] | None] = ContextVar("fedbus_sent_mids", default=None)


def retrieve_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class CheckedClient(aiomqtt.Client):
    """aiomqtt's client, keeping the PUBACK reason codes it would drop (FACTS.md).

    mosquitto acknowledges a QoS 1 publish its ACL denies with reason 0x87 and drops the
    message; aiomqtt resolves the publish as a success. Here failures are kept by packet id
    and ``publish_checked`` raises ``PublishDenied`` for them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: dict[int, tuple[int, str]] = {}
        paho = self._client
        send = paho.publish

        def publish(*a: Any, **kw: Any) -> Any:
            info = send(*a, **kw)
            mids = _SENT_MIDS.get()
            if mids is not None:
                mids.append(info.mid)
            return info

        paho.publish = publish  # type: ignore[method-assign]

    async def _misc_loop(self) -> None:
        """aiomqtt's, waking every keepalive / 4 (at least 1 s) instead of every second: paho's
        ``loop_misc`` only sends pings and checks the keepalive, and a quarter of it is well
        inside the broker's 1.5 x keepalive. An idle trainer's wake-ups, halved with the
        repair loop's (bench_scale at 1,000 idle trainers: 90 -> 45 us of CPU a second each)."""
        tick = max(1.0, self._client._keepalive / 4)
        while True:
            if self._client.loop_misc() != 0:  # not MQTT_ERR_SUCCESS: the connection is gone
                return
            await asyncio.sleep(tick)  # the keepalive's timer

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        value = getattr(reason_code, "value", reason_code)
        if isinstance(value, int) and value >= 0x80:
            self.refused[mid] = (value, str(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_checked(self, topic: str, payload: bytes, *, retain: bool) -> None:
        mids: list[int] = []
        token = _SENT_MIDS.set(mids)
        try:
            await self.publish(topic, payload, qos=1, retain=retain, timeout=math.inf)
        finally:
            _SENT_MIDS.reset(token)
        for mid in mids:
            refused = self.refused.pop(mid, None)
            if refused is not None:
                raise PublishDenied("", topic, *refused)


@dataclass(slots=True)
class Connection:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)


def in_flight(conn: Connection | None) -> str:
    """What this connection's client holds back, for an error that says it got no answer:
    QoS 1 publishes the broker has not acknowledged, those waiting for one of them (paho
    sends at most ``max_inflight`` at once) and packets not yet written."""
    paho = getattr(getattr(conn, "client", None), "_client", None)
    if paho is None:
        return ""
    return (f"; {paho._inflight_messages} publishes unacknowledged, "
            f"{len(paho._out_messages) - paho._inflight_messages} waiting for a slot, "
            f"{len(paho._out_packet)} packets unwritten")


def abort_stalled(conn: Connection, node: str, what: str) -> bool:
    """Drop ``conn``, on which ``what`` has waited for the broker's answer for longer than
    a healthy broker takes; True when dropped. Under a flood, mosquitto 2.0.11 was seen to
    leave a client's QoS 1 publishes unacknowledged for good while answering its pings
    (docs/security.md, "Floods"); the publish's deadline then ended the process. A new
    connection resumes the session, paho sends what is unacknowledged again, and receivers
    drop the duplicates by message id."""
    paho = conn.client._client
    sock: Any = paho._sock
    if sock is None or conn.lost.is_set():
        return False
    silent = time.monotonic() - paho._last_bytes_received
    log.warning("drop_stalled_connection", node=node, waiting=what, silent_s=round(silent, 1))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end: the bus reconnects
    return True


def is_fatal(exc: BaseException) -> bool:
    if not isinstance(exc, MqttConnectError):
        return False
    rc = exc.rc
    value = rc if isinstance(rc, int) else getattr(rc, "value", None)
    return value in _FATAL_CONNACK


def no_delay(sock: Any) -> None:
    """Send small packets at once (TCP_NODELAY), as mosquitto does on its side
    (``set_tcp_nodelay``). paho leaves Nagle on, so a small publish or PUBACK written while
    an earlier small one is unacknowledged waits for the peer's delayed ACK: measured at
    10 x 1M, 27-38 ms for a grant's or a round report's round trip."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:  # a websocket wrapper: the option is not ours to set
        return
    with contextlib.suppress(OSError):
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(host: str, port: int, client_id: str, will_: Will | None, o: MqttOptions,
                max_inflight: int, *, on_connack: Callable[[Properties | None], None],
                deliver: _paho_fast.Deliver | None = None, attempt: int = 0) -> CheckedClient:
    """An aiomqtt client for one connection attempt (the ``attempt``-th retry: its timeout
    doubles each time, up to ``connect_wait_s``, so a broker slowed by a crowd connecting
    at once is given longer instead of being asked again and again), set up as the bus
    needs it."""
    props = properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = o.session_expiry_s
    props.ReceiveMaximum = max(1, min(o.receive_maximum, 65535))
    # The broker drops any packet over this before sending it (MQTT 5 Maximum Packet Size):
    # no oversize publish, forged or not, costs this process memory or a decode.
    props.MaximumPacketSize = o.max_packet
    will = None
    if will_ is not None:
        will = aiomqtt.Will(will_.topic, will_.payload, qos=1, retain=will_.retain)
    tls = None
    if o.tls_ca or o.tls_cert:
        # A client certificate (mTLS) proves the node's identity: the broker's
        # use_identity_as_username makes its CN (= node id) the name the ACL checks.
        tls = aiomqtt.TLSParameters(ca_certs=o.tls_ca, certfile=o.tls_cert,
                                    keyfile=o.tls_key)
    client = CheckedClient(
        host,
        port,
        username=o.username,
        password=o.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=will,
        clean_start=False,
        keepalive=o.keepalive,
        timeout=min(o.connect_timeout_s * 2 ** min(attempt, 16),
                    max(o.connect_timeout_s, o.connect_wait_s or 0.0)),
        max_queued_incoming_messages=0,  # unbounded, counted in stats["incoming_queued"]
        max_inflight_messages=max_inflight,
        properties=props,
        tls_params=tls,
        logger=_paho_log,
    )
    client.pending_calls_threshold = 1 << 30  # chunk bursts are expected, not a warning
    # A connection lost while nothing waits on it (between receive loops, or after this
    # bus closed) is reported by the reconnect loop's own log (``lose_broker``); reading
    # it here keeps asyncio from printing "Future exception was never retrieved" at exit.
    client._disconnected.add_done_callback(retrieve_error)
    # Acknowledge a QoS 1 message only once this bus has handed it on, not as soon as paho
    # has parsed it: with our Receive Maximum, the broker then never has more than
    # ``receive_maximum`` messages on their way into this process, and a sender faster
    # than we read is held back at the broker (bounded by its queue limits) instead of
    # piling up in the client's unbounded queue (measured under a 10,000-message flood:
    # 2,226 messages queued and 2.6x the aggregator's RSS before; 1 and 1.05x after).
    client._client.manual_ack_set(True)
    # One copy from socket to payload instead of paho's seven, and (``deliver``) every
    # PUBLISH handed straight to the bus (fedbus.bus._paho_fast).
    _paho_fast.install(client._client, deliver)
    # aiomqtt drops the CONNACK's properties; the broker's limits are in them.
    paho = client._client
    delegate = cast(Callable[..., None], paho.on_connect)

    def on_connect(*args: Any) -> None:
        props = args[4] if len(args) > 4 else None
        on_connack(props if isinstance(props, Properties) else None)
        no_delay(paho.socket())
        delegate(*args)

    paho.on_connect = on_connect
    return client


def packet_size_problem(props: Properties | None, chunk_bytes: int, endpoint: str
                        ) -> BrokerLimitError | None:
    """The broker's CONNACK announced a packet limit below what this bus sends."""
    packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
    # a chunk frame: fixed header + topic + properties + our chunk header + the chunk
    need = chunk_bytes + HEADER.size + 512
    if isinstance(packet, int) and packet < need:
        return BrokerLimitError(
            f"broker {endpoint} accepts packets up to {packet} bytes (max_packet_size) "
            f"but this node sends chunks of {chunk_bytes} bytes + headers",
            f"max_packet_size in the broker's config to at least {need}, or "
            f"broker.chunk_bytes in the manifest to at most {max(1024, packet - 1024)}")
    return None


def lower_inflight(props: Properties | None, client: aiomqtt.Client, current: int) -> int | None:
    """The broker takes at most its Receive Maximum of unacknowledged QoS 1 publishes: when
    that is below ``current``, lower the client's window to it and return it."""
    receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
    if not (isinstance(receive_max, int) and 0 < receive_max < current):
        return None
    # paho refuses its setter on an open connection (its worry is a change to or from 0,
    # "unlimited"); between two positive limits the attribute is safe to lower.
    client._client._max_inflight_messages = receive_max
    return receive_max
