"""An MQTT connection that speaks typed control messages, on aiomqtt.

``ControlClient`` connects (or fails with a ControlError within ``connect_timeout_s``), remembers its
subscriptions and, when the connection drops, reconnects with exponential backoff and subscribes again.

Sending: every message is signed (:mod:`engine.control.signing`) and goes through an outbox, in order, with
QoS 1. While the broker is away the outbox waits; after the reconnect it sends again whatever the broker had
not acknowledged (the signature's sequence number lets receivers drop a duplicate) and re-publishes the
retained messages this client owns (a restarted broker has forgotten them). Retained messages are states, said
again after a reconnect under fresh sequence numbers, so that no receiver takes them for replays. ``publish`` waits for the broker's
acknowledgement, ``post`` does not. Only when the broker stays away longer than ``broker_timeout_s`` does the
client give up: it ends with :class:`~engine.errors.BrokerLost`, which every waiting publish and every reader
of ``receive`` gets, naming the broker.

Receiving: each message is checked (size, signature, replay, nesting, schema) before it is queued; one that
fails is dropped and counted in ``rejected`` by reason, and logged once per sender and reason. Nothing a
message contains can end the receive loop.

Stopping: ``close()`` cancels the client's loops, and they also end on ``_closed``: on Python 3.11 a cancel that
arrives with a broker acknowledgement is lost inside aiomqtt (its ``asyncio.wait_for``), and a loop that went on
would hold ``close()`` forever. The engine's own code waits with ``asyncio.timeout``, never ``wait_for``.

Only MQTT 3.1.1 core features are used (QoS 1, retained messages, last will, clean sessions), so the client
works on mosquitto and on the embedded amqtt alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from engine.control.broker import BrokerAddress
from engine.control.bus import Inbound, InboxQueue, LastWill
from engine.control.messages import Message
from engine.control.signing import Opener, Rejected, Sealer
from engine.errors import BrokerLost, BrokerUnreachable, ControlError

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 5.0  #: how long close() waits for the broker to take the goodbye

# Without TCP_NODELAY a request/response round trip takes ~90 ms (Nagle + delayed ACK) instead of ~2 ms.
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_SUBACK_FAILURE = 0x80


@dataclass
class _Outgoing:
    """A sealed message waiting in the outbox; ``done`` resolves when the broker acknowledged it."""

    topic: str
    payload: bytes
    retain: bool
    kind: str
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ControlClient:
    """One client connection to the broker; use as ``async with ControlClient(...) as client``."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        key: bytes,
        will: LastWill | None = None,
        keepalive_s: int = 5,
        connect_timeout_s: float = 3.0,
        operation_timeout_s: float = 5.0,
        max_backoff_s: float = 2.0,
        broker_timeout_s: float = 60.0,
        first_seq: int = 0,
    ):
        self.address = address
        self.client_id = client_id
        self._sealer = Sealer(key, client_id, first_seq)
        self._opener = Opener(key)
        self._will = will
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._operation_timeout_s = operation_timeout_s
        self._max_backoff_s = max_backoff_s
        self._broker_timeout_s = broker_timeout_s
        self._filters: list[str] = []
        self._inbox = InboxQueue()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_ready = asyncio.Event()
        self._retained: dict[str, bytes] = {}  # topic -> what this client keeps retained there
        self._connection: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost_at: float | None = None  # monotonic time the connection dropped, None while connected
        self._tasks: list[asyncio.Task[None]] = []
        self._ended: ControlError | None = None
        self._closed = False
        self.reconnects = 0  # connections re-established after a loss
        self.rejected: Counter[str] = Counter()  # received messages dropped, by reason
        self._rejections_logged: set[tuple[str, str]] = set()

    async def __aenter__(self) -> ControlClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        """Connect once; ControlError if the broker cannot be reached or refuses us. Then stay connected."""
        if self._tasks or self._closed:
            raise ControlError(f"control client {self.client_id!r} is already connected or closed")
        connection = await self._open()
        for job, name in ((self._maintain(connection), "receive loop"), (self._drain(), "send loop")):
            task = asyncio.create_task(job, name=f"mqtt {self.client_id} {name}")
            task.add_done_callback(functools.partial(self._task_ended, name))
            self._tasks.append(task)

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and end ``messages()``."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        connection, self._connection = self._connection, None
        self._connected.clear()
        if connection is not None:  # a broker that does not answer the goodbye does not hold the close up
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.__aexit__(None, None, None)
        self._end(ControlError(f"control client {self.client_id!r} was closed"))

    async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait until the broker has it (through a reconnect if need be); BrokerLost
        once the broker has been away longer than ``broker_timeout_s``."""
        await self._enqueue(topic, self._sealer.seal(topic, message), retain, message.kind).done

    def post(self, topic: str, message: Message, *, retain: bool = False) -> None:
        """Publish without waiting: the outbox sends it in order; if it never can, the client ends (BrokerLost)."""
        outgoing = self._enqueue(topic, self._sealer.seal(topic, message), retain, message.kind)
        outgoing.done.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen: the client ends

    async def clear_retained(self, topic: str) -> None:
        """Remove the retained message of a topic (an empty retained publish)."""
        self._retained.pop(topic, None)
        await self._enqueue(topic, b"", True, "clear retained").done

    def _enqueue(self, topic: str, payload: bytes, retain: bool, kind: str) -> _Outgoing:
        if self._ended is not None:
            raise self._ended
        if retain and payload:
            self._retained[topic] = payload
        outgoing = _Outgoing(topic, payload, retain, kind)
        self._outbox.append(outgoing)
        self._outbox_ready.set()
        return outgoing

    async def _drain(self) -> None:
        """Send the outbox in order; a message the broker did not acknowledge is sent again after the reconnect."""
        while not self._closed:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            outgoing = self._outbox[0]
            await self._connected.wait()
            connection = self._connection
            assert connection is not None
            try:
                await connection.publish(outgoing.topic, outgoing.payload, qos=1, retain=outgoing.retain,
                                         timeout=self._operation_timeout_s)
            except aiomqtt.MqttError as exc:
                log.warning("control client %s: %r to %s not acknowledged (%s); sending it again after the reconnect",
                            self.client_id, outgoing.kind, outgoing.topic, exc)
                if self._connection is connection:  # the receive loop has not noticed yet: wait for it
                    await asyncio.sleep(0.05)
                continue
            if self._outbox and self._outbox[0] is outgoing:  # else the client ended meanwhile
                self._outbox.popleft()
            if not outgoing.done.done():
                outgoing.done.set_result(None)

    @property
    def broker_away_s(self) -> float:
        """Seconds since the connection to the broker dropped; 0 while connected."""
        return 0.0 if self._lost_at is None else time.monotonic() - self._lost_at

    async def subscribe(self, topic_filter: str) -> None:
        """Subscribe with QoS 1, now and after every reconnect; retained messages arrive after this returns."""
        connection = await self._wait_connected(f"subscribing to {topic_filter}")
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        await self._subscribe(connection, topic_filter)

    def forget_sender(self, sender: str) -> None:
        """Accept ``sender``'s sequence numbers from 0 again: it was started again (engine.control.signing)."""
        self._opener.forget(sender)

    async def receive(self, timeout_s: float) -> Inbound | None:
        """The next message, or None when none arrived within ``timeout_s``; ControlError once closed."""
        return await self._inbox.get(timeout_s)

    def nudge(self) -> None:
        self._inbox.nudge()

    async def messages(self) -> AsyncIterator[Inbound]:
        """Every received message, in arrival order, until the client is closed."""
        async for inbound in self._inbox:
            yield inbound

    async def _wait_connected(self, what: str) -> aiomqtt.Client:
        if self._ended is not None:
            raise ControlError(f"{what}: {self._ended}")
        try:
            async with asyncio.timeout(self._broker_timeout_s):
                await self._connected.wait()
        except TimeoutError:
            raise BrokerLost(
                f"{what}: not connected to broker {self.address.display} for {self._broker_timeout_s:g} s"
            ) from None
        assert self._connection is not None
        return self._connection

    async def _subscribe(self, connection: aiomqtt.Client, topic_filter: str) -> None:
        try:
            granted = await connection.subscribe(topic_filter, qos=1, timeout=self._operation_timeout_s)
        except aiomqtt.MqttError as exc:
            raise ControlError(f"subscribing to {topic_filter} on broker {self.address.display} failed: {exc}") from exc
        if any(code.is_failure if isinstance(code, ReasonCode) else code >= _SUBACK_FAILURE for code in granted):
            raise ControlError(f"broker {self.address.display} refused the subscription to {topic_filter}")

    def _connection_for(self) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            payload = self._sealer.seal(self._will.topic, self._will.message)
            will = aiomqtt.Will(self._will.topic, payload, qos=1, retain=self._will.retain)
        return mqtt_connection(self.address, self.client_id, will=will, keepalive_s=self._keepalive_s,
                               timeout_s=self._connect_timeout_s)

    async def _open(self) -> aiomqtt.Client:
        """Connect, subscribe to every remembered filter, and mark the client connected."""
        where = self.address.display
        connection = self._connection_for()
        try:
            async with asyncio.timeout(self._connect_timeout_s + 1):
                await connection.__aenter__()
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # aiomqtt leaves the socket of a failed handshake open; paho closes it after sending DISCONNECT.
            connection._client.disconnect()  # noqa: SLF001
            if isinstance(exc, MqttConnectError):
                raise ControlError(
                    f"broker at {where} refused the connection: {exc} (check user name and password)"
                ) from exc
            reason = str(exc) if isinstance(exc, aiomqtt.MqttError) else f"no answer within {self._connect_timeout_s:g} s"
            raise BrokerUnreachable(f"cannot reach broker at {where}: {reason}") from exc
        try:
            for topic_filter in self._filters:
                await self._subscribe(connection, topic_filter)
            # A restarted broker forgot what we keep retained: it is announced again, as what still waits in the
            # outbox is sent again. A retained message is a state, so each goes out under a fresh sequence number:
            # a receiver that had it already takes it as the same state said again, not as a replay.
            waiting = self._reseal_waiting_states()
            for topic, payload in list(self._retained.items()):
                if topic not in waiting:
                    self._retained[topic] = payload = self._reseal(topic, payload)
                    await connection.publish(topic, payload, qos=1, retain=True, timeout=self._operation_timeout_s)
        except (ControlError, aiomqtt.MqttError):
            with contextlib.suppress(aiomqtt.MqttError):
                await connection.__aexit__(None, None, None)
            raise
        self._connection = connection
        self._connected.set()
        return connection

    def _reseal(self, topic: str, payload: bytes) -> bytes:
        """The same message signed again under a fresh sequence number."""
        return self._sealer.seal_body(topic, payload.partition(b"\n")[2])

    def _reseal_waiting_states(self) -> set[str]:
        """Re-sign the retained messages waiting in the outbox (see ``_open``); their topics."""
        topics = set()
        for outgoing in self._outbox:
            if outgoing.retain and outgoing.payload:
                fresh = self._reseal(outgoing.topic, outgoing.payload)
                if self._retained.get(outgoing.topic) == outgoing.payload:
                    self._retained[outgoing.topic] = fresh
                outgoing.payload = fresh
                topics.add(outgoing.topic)
        return topics

    def _task_ended(self, name: str, task: asyncio.Task[None]) -> None:
        """The client's loops only end by close() or a lost broker; any other end is reported, never silent."""
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, ControlError):
            log.error("control client %s: %s", self.client_id, error)
            self._end(error)
        elif error is not None:
            log.error("control client %s: its %s failed", self.client_id, name, exc_info=error)
            self._end(ControlError(f"control client {self.client_id!r} stopped: its {name} failed with {error!r}"))

    def _end(self, error: ControlError) -> None:
        """No more sending or receiving: readers and every waiting publish get ``error``."""
        if self._ended is None:
            self._ended = error
        self._closed = True
        self._connected.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        while self._outbox:
            outgoing = self._outbox.popleft()
            if not outgoing.done.done():
                outgoing.done.set_exception(self._ended)
        self._inbox.end(self._ended)

    async def _maintain(self, connection: aiomqtt.Client) -> None:
        """Receive until the connection drops, then reconnect with backoff; runs until close()."""
        while not self._closed:
            try:
                async for raw in connection.messages:
                    self._accept(raw)
            except aiomqtt.MqttError as exc:
                log.warning("control client %s lost broker %s: %s; reconnecting", self.client_id, self.address.display, exc)
            self._lost_at = time.monotonic()
            self._connected.clear()
            self._connection = None
            with contextlib.suppress(aiomqtt.MqttError):
                await connection.__aexit__(None, None, None)
            connection = await self._reconnect()

    async def _reconnect(self) -> aiomqtt.Client:
        """Connect again, or raise BrokerLost once the broker has been away longer than ``broker_timeout_s``."""
        assert self._lost_at is not None
        delay, failures = 0.05, 0
        while True:
            away_s = time.monotonic() - self._lost_at
            if away_s > self._broker_timeout_s:
                raise BrokerLost(f"broker lost: no connection to broker {self.address.display} for {away_s:.1f} s "
                                 f"(timeouts.broker_s is {self._broker_timeout_s:g})")
            try:
                connection = await self._open()
            except ControlError as exc:  # said once per outage: a broker away for hours is not a log flood
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG, "control client %s: %s; retrying quietly "
                        "every %g s at most", self.client_id, exc, self._max_backoff_s)
                await asyncio.sleep(min(delay, self._broker_timeout_s - away_s + 0.01))
                delay = min(2 * delay, self._max_backoff_s)
                continue
            self.reconnects += 1
            log.info("control client %s reconnected to broker %s after %.1f s (%d failed tries)", self.client_id,
                     self.address.display, time.monotonic() - self._lost_at, failures)
            self._lost_at = None
            return connection

    def _accept(self, raw: aiomqtt.Message) -> None:
        topic = raw.topic.value
        payload = raw.payload
        if not isinstance(payload, bytes | bytearray):
            log.warning("dropping control message on %s: payload is %s, not bytes", topic, type(payload).__name__)
            return
        if not payload:
            return  # a cleared retained message
        try:
            opened = self._opener.open(topic, bytes(payload))
        except Rejected as exc:
            if exc.reason == "replayed" and raw.retain:
                return  # a retained message seen before, delivered again on (re)subscribing: nothing new
            self.rejected[exc.reason] += 1
            who = exc.sender or "an unknown sender"
            if (who, exc.reason) not in self._rejections_logged:  # once per sender and reason: a flood stays quiet
                self._rejections_logged.add((who, exc.reason))
                log.warning("control client %s dropped a message on %s: %s (further ones from %s counted, not logged)",
                            self.client_id, topic, exc, who)
            return
        self._inbox.put(Inbound(topic=topic, message=opened.message, retained=raw.retain, sender=opened.sender))


def mqtt_connection(address: BrokerAddress, client_id: str, *, will: aiomqtt.Will | None = None, keepalive_s: int = 5,
                    timeout_s: float = 3.0) -> aiomqtt.Client:
    """An aiomqtt client (not connected yet) as the engine connects: MQTT 3.1.1, clean session, TLS as the address
    says, no Nagle."""
    tls_params = tls_insecure = None
    if address.tls is not None:
        tls = address.tls
        tls_params = aiomqtt.TLSParameters(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
        )
        tls_insecure = tls.insecure
    connection = aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        will=will,
        keepalive=keepalive_s,
        timeout=timeout_s,
        tls_params=tls_params,
        tls_insecure=tls_insecure,
        socket_options=[_NODELAY],
        logger=log,
    )
    # paho's blocking TCP connect runs in a thread that a timeout cannot stop; bound it by our timeout so
    # that an abandoned attempt cannot connect later and take over this client id.
    connection._client.connect_timeout = timeout_s  # noqa: SLF001
    return connection
