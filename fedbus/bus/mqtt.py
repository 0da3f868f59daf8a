"""The MQTT 5 bus on aiomqtt: reconnects, resubscribes, persistent sessions, wills, chunking.

A background task owns ``async with aiomqtt.Client(...)`` in a reconnect loop with jittered
exponential backoff; publish and subscribe wait (bounded) for a connection instead of failing.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar, cast

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedbus.bus._base import Admit, Screen, Will
from fedbus.bus._chunking import ChunkLimits, is_chunk_frame, plan
from fedbus.bus._dispatch import Dispatcher, QueueSubscription, receive_stats
from fedbus.bus._mqtt_client import (
    CheckedClient,
    Connection,
    abort_stalled,
    in_flight,
    is_fatal,
    lower_inflight,
    make_client,
    packet_size_problem,
    properties,
)
from fedbus.bus._repair import Repair
from fedbus.bus.options import MqttOptions
from fedbus.errors import (
    BrokerLimitError,
    BusError,
    ConnectError,
    PublishDenied,
    SubscribeDenied,
)
from fedbus.topics import matches

__all__ = ["MqttBus", "MqttOptions"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# retainHandling: 0 = send retained on every SUBSCRIBE, 1 = only if the subscription is new.
_RETAIN_ALWAYS = 0
_RETAIN_IF_NEW = 1


class MqttBus:
    """A ``Bus`` over an MQTT 5 broker (mosquitto in practice). See docs/broker.md.

    The session is persistent (fixed client id, clean_start False, ``session_expiry_s``), so
    QoS 1 messages published while this node is offline are delivered when it reconnects, as
    long as the broker keeps the session. Every active filter is re-subscribed on reconnect.
    Delivery is at-least-once: a publish interrupted by a disconnect is sent again.

    Known limits: a chunked payload sent to a ``$share`` group is split across members and
    never reassembled (keep shared-group payloads under ``chunk_bytes``); retained payloads are
    never chunked, so they must fit the broker's packet limit; a new local subscription on a
    filter already held by another subscription of this bus re-subscribes, and the older one
    may see that filter's retained messages again.
    """

    def __init__(
        self, node_id: str, host: str, port: int = 1883, *, client_id: str | None = None,
        will: Will | None = None, birth: Will | None = None, options: MqttOptions | None = None,
    ) -> None:
        o = options or MqttOptions()
        chunk_bytes = o.chunk_bytes
        if will is not None and (
            len(will.payload) > chunk_bytes or "+" in will.topic or "#" in will.topic
        ):
            raise BusError(f"will on {will.topic!r} must be a plain topic and fit in one chunk")
        self.node_id = node_id
        self.host = host
        self.port = port
        self.client_id = client_id or node_id  # == node id, so ACL %c rules match
        self.birth = birth
        self.will = will
        self.chunk_bytes = chunk_bytes
        # ``limits`` wins when given; ``max_message_bytes`` is the shorthand for the common case.
        lim = o.limits or ChunkLimits(
            max_message_bytes=o.max_message_bytes, max_buffered_bytes=2 * o.max_message_bytes
        )
        self.limits = lim
        self.options = o
        self._backoff = (o.reconnect_min_s, o.reconnect_max_s)
        self._connect_timeout_s, self._connect_wait_s = (o.connect_timeout_s,
                                                          o.connect_wait_s or o.connect_timeout_s)
        self._publish_timeout_s = o.publish_timeout_s
        self._stall_s = max(5.0, float(o.keepalive))  # see abort_stalled
        #: Lowered to the broker's Receive Maximum when it announces a smaller one.
        self._max_inflight = o.max_inflight

        self._dispatch = Dispatcher(lim)
        self._repair = Repair(node_id, self._dispatch.reassembler, send_frame=self._resend,
                              publish=self.publish, subscribe=self.subscribe,
                              limits=o.repair_limits)
        self._sub_ids: dict[str, int] = {}
        self._filters_by_id: dict[int, str] = {}
        self._stale: set[str] = set()  # unsubscribed while offline; unsubscribe on reconnect
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._refused = asyncio.Event()  # the broker refused us for good before a first connect
        self._connect_seen = asyncio.Condition()
        self._gate = asyncio.Event()  # cleared by fault-injection tests to hold reconnects
        self._gate.set()
        self._closing = False
        self._state = "new"
        self._runner: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._last_error = "no attempt yet"
        #: Set when the broker's limits cannot work with ours: no reconnect will fix it.
        self._fatal: BusError | None = None
        self._connack: Properties | None = None
        self._counters: dict[str, int] = dict.fromkeys(
            ("published", "published_bytes", "chunks_sent", "received", "connects",
             "reconnects", "connect_failures", "connection_losses", "publish_retries",
             "publish_denied", "subscribe_denied", "op_retries", "stalls"),
            0,
        )  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def stats(self) -> dict[str, int]:
        conn = self._conn
        return {**self._counters,
                "incoming_queued": len(conn.client.messages) if conn else 0,
                **receive_stats(self._dispatch, self._repair.counters)}

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> MqttBus:
        if self._state != "new":
            raise BusError(f"bus {self.node_id} cannot be reopened; make a new one")
        self._state = "open"
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-connection-{self.node_id}")
        self._janitor = asyncio.create_task(self._expire_loop(), name=f"mqtt-expiry-{self.node_id}")
        self._repair.start()
        try:
            async with asyncio.timeout(self._connect_wait_s):
                waits = [asyncio.ensure_future(e.wait()) for e in (self._connected, self._refused)]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            if self._fatal is not None:
                raise self._fatal
            if not self._connected.is_set():
                raise TimeoutError
        except TimeoutError:
            await self._shutdown()
            raise ConnectError(self.endpoint, self._last_error) from None
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._shutdown()

    async def wait_connected(self, connects: int = 1) -> None:
        """Wait until connected after at least ``connects`` successful connections in total.

        ``wait_connected(bus.stats["connects"] + 1)`` waits for the next reconnect. Bound it
        with ``asyncio.timeout``.
        """
        async with self._connect_seen:
            await self._connect_seen.wait_for(
                lambda: self._conn is not None and self._counters["connects"] >= connects
            )

    async def kill(self) -> None:
        """Fault injection: vanish like a crashed process (TCP closed, no DISCONNECT).

        The broker publishes the will; the session stays for ``session_expiry_s``.
        """
        self._closing = True
        self._abort_socket()
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        self._state = "closed"
        self._repair.stop()
        for task in (self._janitor, self._runner):
            if task is not None and not task.done():
                # Cancelling the runner exits ``async with client`` -> graceful DISCONNECT,
                # unless the socket was already aborted.
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._dispatch.close_all()

    def _abort_socket(self) -> None:
        conn = self._conn
        sock = conn.client._client.socket() if conn is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def _drop_connection(self, *, hold: bool = False) -> None:
        """Fault injection: drop the TCP connection abruptly; the bus reconnects by itself.

        With ``hold`` it stays offline until ``_resume()``.
        """
        if hold:
            self._gate.clear()
        conn = self._conn
        self._abort_socket()
        if conn is not None:
            async with asyncio.timeout(5):
                await conn.lost.wait()

    def _resume(self) -> None:
        self._gate.set()

    # -- connection loop ---------------------------------------------------------------------

    def _make_client(self, attempt: int = 0) -> CheckedClient:
        def seen(props: Properties | None) -> None:
            self._connack = props
        return make_client(self.host, self.port, self.client_id, self.will, self.options,
                           self._max_inflight, on_connack=seen, deliver=self._on_frame,
                           attempt=attempt)

    def _shared_unavailable(self) -> bool:
        """The broker's CONNACK said it has no ``$share`` subscriptions (absent: it has)."""
        return getattr(self._connack, "SharedSubscriptionAvailable", 1) == 0

    def _check_broker_limits(self, client: aiomqtt.Client) -> None:
        """Compare what the broker announced in its CONNACK with what this bus will send."""
        props = self._connack
        problem = packet_size_problem(props, self.chunk_bytes, self.endpoint)
        if problem is not None:
            raise problem
        lowered = lower_inflight(props, client, self._max_inflight)
        if lowered is not None:
            log.info("limit_inflight", node=self.node_id, broker_receive_maximum=lowered)
            self._max_inflight = lowered

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            await self._gate.wait()
            client = self._make_client(attempt)
            conn: Connection | None = None
            try:
                async with client:
                    self._check_broker_limits(client)
                    conn = Connection(client)
                    await self._restore(client)
                    if self.birth is not None and self._counters["connects"] > 0:
                        # The will announced us gone when the last connection dropped; say we
                        # are back, or peers keep us for dead. Only on REconnects: _restore
                        # has re-subscribed, so "online" still means "listening". On the first
                        # connect the service announces itself once it has subscribed.
                        await self._publish_on(client, self.birth.topic, self.birth.payload,
                                               retain=self.birth.retain, birth=True)
                    self._conn = conn
                    self._connected.set()
                    self._counters["connects"] += 1
                    if self._counters["connects"] > 1:
                        self._counters["reconnects"] += 1
                    async with self._connect_seen:
                        self._connect_seen.notify_all()
                    log.info("connect_broker", node=self.node_id, endpoint=self.endpoint)
                    attempt = 0
                    await self._receive(client)
            except BrokerLimitError as exc:
                self._fatal = exc
                self._last_error = str(exc)
                log.error("refuse_broker", node=self.node_id, endpoint=self.endpoint,
                          error=str(exc))
                self._refused.set()
                return
            except (aiomqtt.MqttError, OSError) as exc:
                self._last_error = str(exc) or type(exc).__name__
                if conn is None:
                    self._counters["connect_failures"] += 1
                    if is_fatal(exc) and self._counters["connects"] == 0:
                        self._refused.set()
                else:
                    self._counters["connection_losses"] += 1
                log.warning(
                    "lose_broker" if conn else "fail_connect",
                    node=self.node_id,
                    endpoint=self.endpoint,
                    error=self._last_error,
                )
            finally:
                self._conn = None
                self._connected.clear()
                if conn is not None:
                    conn.lost.set()
            if self._closing:
                return
            low, high = self._backoff
            delay = min(high, low * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            await asyncio.sleep(delay)  # backoff timer, not a condition wait

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Hand on what aiomqtt queues (a transport without ``_paho_fast``'s direct hand-off)
        until the connection drops: drained in one go, only an empty queue waits (aiomqtt's
        iterator costs a task a message). QoS 1 is acknowledged once handed on."""
        queue: asyncio.Queue[aiomqtt.Message] = client._queue
        disconnected: asyncio.Future[None] = client._disconnected
        ack = client._client.ack
        while True:
            get = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait((get, disconnected), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if not get.done() or get.cancelled():
                cause = None
                if disconnected.done() and not disconnected.cancelled():
                    cause = disconnected.exception()
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
            m: aiomqtt.Message | None = get.result()
            while m is not None:  # the first one, then whatever queued meanwhile, in order
                self._on_message(m)
                if m.qos > 0:
                    ack(m.mid, m.qos)
                m = queue.get_nowait() if not queue.empty() else None

    async def _restore(self, client: aiomqtt.Client) -> None:
        """After (re)connecting: drop filters closed while offline, re-subscribe active ones."""
        for f in list(self._stale):
            await client.unsubscribe(f)
            self._stale.discard(f)
        # retain-if-new: a resumed session does not replay retained messages, a lost one does.
        # A filter refused now (the ACL changed while away) is counted and logged, no more.
        results = await asyncio.gather(
            *(self._subscribe_on(client, f, _RETAIN_IF_NEW) for f in self._dispatch.filters),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, SubscribeDenied):
                raise r

    async def _subscribe_on(
        self, client: aiomqtt.Client, topic_filter: str, retain_handling: int
    ) -> None:
        sid = self._sub_ids.get(topic_filter)
        if sid is None:
            sid = len(self._sub_ids) + 1
            self._sub_ids[topic_filter] = sid
            self._filters_by_id[sid] = topic_filter
        if topic_filter.startswith("$share/") and self._shared_unavailable():
            # Refused here, with a reason, rather than sent: a broker without shared
            # subscriptions (ejabberd 23.01) drops the whole connection on one.
            self._counters["subscribe_denied"] += 1
            log.warning("deny_subscribe", node=self.node_id, filter=topic_filter,
                        reason="shared subscriptions not available", code=0x9E)
            raise SubscribeDenied(self.node_id, topic_filter, 0x9E,
                                  "Shared Subscriptions not supported (the broker's CONNACK "
                                  "says so)", "use a broker with $share subscriptions "
                                  "(mosquitto) for simulation workers")
        props = properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sid
        opts = SubscribeOptions(qos=1, retainHandling=retain_handling)
        codes = await client.subscribe(topic_filter, options=opts, properties=props)
        for code in codes:
            value = code if isinstance(code, int) else code.value
            if value >= 0x80:
                self._counters["subscribe_denied"] += 1
                log.warning("deny_subscribe", node=self.node_id, filter=topic_filter,
                            reason=str(code), code=value)
                raise SubscribeDenied(self.node_id, topic_filter, value, str(code))

    async def _publish_on(self, client: CheckedClient, topic: str, payload: bytes, *, retain: bool,
                          birth: bool = False) -> None:
        """Publish once on ``client``; a refusal is counted, logged and raised (not retried)."""
        try:
            await client.publish_checked(topic, payload, retain=retain)
        except PublishDenied as exc:
            self._counters["publish_denied"] += 1
            log.warning("deny_publish", node=self.node_id, topic=topic, reason=exc.reason,
                        code=exc.code)
            if birth:
                return  # the reconnect goes on; the counter and the log say what happened
            raise PublishDenied(self.node_id, topic, exc.code, exc.reason) from None

    def _on_message(self, m: aiomqtt.Message) -> None:
        """A message through aiomqtt's queue (transports without the direct hand-off)."""
        payload: Any = m.payload
        if isinstance(payload, bytes | bytearray | memoryview):
            ids: list[int] = list(getattr(m.properties, "SubscriptionIdentifier", None) or [])
            self._on_frame(m.topic.value, payload, bool(m.retain), ids)

    def _on_frame(self, topic: str, payload: bytes | bytearray | memoryview, retain: bool,
                  ids: list[int]) -> None:
        """One PUBLISH, straight from paho's reader (``_paho_fast``) or via ``_on_message``."""
        self._counters["received"] += 1
        via = [self._filters_by_id[i] for i in ids if i in self._filters_by_id]
        if not via:
            via = [f for f in self._dispatch.filters if matches(f, topic)]
        # A chunk frame stays a view of paho's buffer until its transfer is joined (the one
        # copy); anything else is copied out here, once, so subscribers always get bytes.
        data = payload if isinstance(payload, memoryview) and is_chunk_frame(payload) else (
            bytes(payload))
        self._dispatch.deliver(topic, data, retain=retain, via=via)

    async def _expire_loop(self) -> None:
        tick = max(0.5, self.limits.transfer_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)  # periodic housekeeping timer
            self._dispatch.reassembler.expire()

    # -- operations --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise BusError(f"bus {self.node_id} is not open: use `async with bus:`")

    async def _call(
        self, op: Callable[[aiomqtt.Client], Awaitable[T]], deadline: float, what: str
    ) -> T:
        """Run ``op`` on a live connection; retry on the next one if this one drops."""
        loop = asyncio.get_running_loop()
        unanswered = False  # the last try ran out of time on a live connection
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._closing:
                raise BusError(f"bus {self.node_id} closed during {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = ("no answer on a live connection: the broker or this process is "
                       f"overloaded{in_flight(self._conn)}" if unanswered
                       else f"no connection ({self._last_error})")
                raise BusError(f"{what}: {why} ({self.endpoint})")
            conn = self._conn
            if conn is None:
                try:
                    async with asyncio.timeout(remaining):
                        await self._connected.wait()
                except TimeoutError:
                    continue
                continue
            task: asyncio.Task[T] = asyncio.ensure_future(op(conn.client))
            lost = asyncio.ensure_future(conn.lost.wait())
            try:
                done: set[asyncio.Future[Any]] = set()
                while not done and (left := deadline - loop.time()) > 0:
                    done, _ = await asyncio.wait({task, lost}, timeout=min(left, self._stall_s),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if not done and abort_stalled(conn, self.node_id, what):
                        self._counters["stalls"] += 1  # `lost` follows: tried again anew
            finally:
                lost.cancel()
                if not task.done():
                    task.cancel()
            unanswered = not done
            if task in done:
                exc = task.exception()
                if exc is None:
                    return task.result()
                if not isinstance(exc, aiomqtt.MqttError):
                    raise exc
                if not conn.lost.is_set() and "timed out" in str(exc):
                    # No answer in the client's timeout on a live connection: the broker is busy
                    # (a thousand connections subscribing at once), not gone. Ask again.
                    self._counters["op_retries"] += 1
                    log.info("retry_slow_op", node=self.node_id, what=what)
                    continue
                # Connection trouble surfaced first: wait for the loss to register, then retry.
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await conn.lost.wait()
                except TimeoutError:
                    raise BusError(f"{what} failed on {self.endpoint}: {exc}") from exc
            self._counters["publish_retries"] += 1

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        """Publish at QoS 1, chunking above ``chunk_bytes``; waits for a connection if needed
        (``BusError`` after ``publish_timeout_s``). ``tail``: as in ``Bus.publish``."""
        self._check_open()
        if not topic or "+" in topic or "#" in topic:
            raise BusError(f"cannot publish to {topic!r}: topics have no wildcards")
        data, total = bytes(payload), len(payload) + len(tail)
        if total > self.limits.max_message_bytes:
            raise BusError(f"payload of {total} bytes exceeds "
                           f"max_message_bytes={self.limits.max_message_bytes}")
        deadline = asyncio.get_running_loop().time() + self._publish_timeout_s
        size = max(self.chunk_bytes, total, 1) if retain else self.chunk_bytes

        def sender(part: bytes) -> Callable[[aiomqtt.Client], Awaitable[None]]:
            async def send(client: aiomqtt.Client) -> None:
                await self._publish_on(cast(CheckedClient, client), topic, part, retain=retain)

            return send

        what = f"publish to {topic}"
        transfer = plan(data, size, tail=tail)
        if transfer is None:
            await self._call(sender(data + tail if tail else data), deadline, what)
        else:
            self._repair.sent(topic, transfer)  # kept a while, to resend lost chunks on NACK
            # Pipeline chunks: paho sends them in creation order; the window bounds the copies.
            window: deque[asyncio.Task[None]] = deque()
            try:
                for index in range(transfer.count):
                    part = self._frame_out(transfer.frame(index))
                    if part is None:
                        continue
                    window.append(asyncio.create_task(self._call(sender(part), deadline, what)))
                    self._counters["chunks_sent"] += 1
                    if len(window) >= self._max_inflight:
                        await window.popleft()
                while window:
                    await window.popleft()
            finally:
                for t in window:
                    t.cancel()
        self._counters["published"] += 1
        self._counters["published_bytes"] += total

    def _frame_out(self, frame: bytes) -> bytes | None:
        """A chunk frame about to be sent (None: do not send it; a lossy test bus's hook)."""
        return frame

    async def _resend(self, topic: str, frame: bytes) -> None:
        """Publish one rebuilt chunk frame as it is (a NACK's answer)."""
        part = self._frame_out(frame)
        if part is None or self._state != "open":
            return
        deadline = asyncio.get_running_loop().time() + self._publish_timeout_s

        async def send(client: aiomqtt.Client) -> None:
            await self._publish_on(cast(CheckedClient, client), topic, part, retain=False)

        await self._call(send, deadline, f"resend to {topic}")
        self._counters["chunks_sent"] += 1

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None,
                  screen: Screen | None = None) -> QueueSubscription:
        return QueueSubscription(filters, self._open_sub, self._close_sub, admit=admit,
                                 max_queued_bytes=max_queued_bytes, screen=screen)

    async def _open_sub(self, sub: QueueSubscription) -> None:
        self._check_open()
        self._dispatch.add(sub)
        deadline = asyncio.get_running_loop().time() + self._publish_timeout_s
        try:
            for f in dict.fromkeys(sub.filters):
                self._stale.discard(f)

                def op(client: aiomqtt.Client, f: str = f) -> Awaitable[None]:
                    return self._subscribe_on(client, f, _RETAIN_ALWAYS)

                await self._call(op, deadline, f"subscribe to {f}")
        except BaseException:
            await self._close_sub(sub)
            raise

    async def _close_sub(self, sub: QueueSubscription) -> None:
        for f in self._dispatch.remove(sub):
            conn = self._conn
            if conn is None or self._closing:
                if not self._closing:
                    self._stale.add(f)
                continue
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await conn.client.unsubscribe(f)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                self._stale.add(f)
                log.info("defer_unsubscribe", node=self.node_id, filter=f, error=str(exc))


