"""An MQTT connection that speaks typed control messages, on aiomqtt.

``ControlClient`` connects (or fails with a ControlError within ``connect_timeout_s``), publishes messages
with QoS 1, remembers its subscriptions and, when the connection drops, reconnects with exponential backoff
and subscribes again. Received messages are decoded into the :mod:`engine.control.messages` models and queued;
an invalid message is logged with its topic and reason and dropped, never raised into the receive loop.

Only MQTT 3.1.1 core features are used (QoS 1, retained messages, last will, clean sessions), so the client
works on mosquitto and on the embedded amqtt alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from types import TracebackType

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from engine.control.broker import BrokerAddress
from engine.control.bus import Inbound, InboxQueue, LastWill
from engine.control.messages import Message, decode, encode
from engine.errors import ControlError

log = logging.getLogger(__name__)

# Without TCP_NODELAY a request/response round trip takes ~90 ms (Nagle + delayed ACK) instead of ~2 ms.
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_SUBACK_FAILURE = 0x80


class ControlClient:
    """One client connection to the broker; use as ``async with ControlClient(...) as client``."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        will: LastWill | None = None,
        keepalive_s: int = 5,
        connect_timeout_s: float = 3.0,
        operation_timeout_s: float = 5.0,
        max_backoff_s: float = 2.0,
    ):
        self.address = address
        self.client_id = client_id
        self._will = will
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._operation_timeout_s = operation_timeout_s
        self._max_backoff_s = max_backoff_s
        self._filters: list[str] = []
        self._inbox = InboxQueue(client_id)
        self._connection: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0  # connections re-established after a loss, for diagnostics

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
        if self._maintainer is not None or self._closed:
            raise ControlError(f"control client {self.client_id!r} is already connected or closed")
        connection = await self._open()
        self._maintainer = asyncio.create_task(self._maintain(connection), name=f"mqtt {self.client_id}")
        self._maintainer.add_done_callback(self._maintainer_ended)

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and end ``messages()``."""
        self._closed = True
        if self._maintainer is not None and not self._maintainer.done():
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        connection, self._connection = self._connection, None
        self._connected.clear()
        if connection is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await connection.__aexit__(None, None, None)
        self._inbox.end("was closed")

    async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the broker's acknowledgement."""
        what = f"publishing {message.kind!r} to {topic}"
        connection = await self._wait_connected(what)
        try:
            await connection.publish(topic, encode(message), qos=1, retain=retain, timeout=self._operation_timeout_s)
        except aiomqtt.MqttError as exc:
            raise ControlError(f"{what} on broker {self.address.display} failed: {exc}") from exc

    async def clear_retained(self, topic: str) -> None:
        """Remove the retained message of a topic (an empty retained publish)."""
        connection = await self._wait_connected(f"clearing the retained message of {topic}")
        try:
            await connection.publish(topic, b"", qos=1, retain=True, timeout=self._operation_timeout_s)
        except aiomqtt.MqttError as exc:
            raise ControlError(f"clearing retained {topic} on broker {self.address.display} failed: {exc}") from exc

    async def subscribe(self, topic_filter: str) -> None:
        """Subscribe with QoS 1, now and after every reconnect; retained messages arrive after this returns."""
        connection = await self._wait_connected(f"subscribing to {topic_filter}")
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        await self._subscribe(connection, topic_filter)

    async def receive(self, timeout_s: float) -> Inbound | None:
        """The next message, or None when none arrived within ``timeout_s``; ControlError once closed."""
        return await self._inbox.get(timeout_s)

    async def messages(self) -> AsyncIterator[Inbound]:
        """Every received message, in arrival order, until the client is closed."""
        async for inbound in self._inbox:
            yield inbound

    async def _wait_connected(self, what: str) -> aiomqtt.Client:
        if self._closed:
            raise ControlError(f"{what}: control client {self.client_id!r} is closed")
        try:
            await asyncio.wait_for(self._connected.wait(), self._operation_timeout_s)
        except asyncio.TimeoutError:
            raise ControlError(
                f"{what}: not connected to broker {self.address.display} for {self._operation_timeout_s:g} s"
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
        tls_params = tls_insecure = None
        if self.address.tls is not None:
            tls = self.address.tls
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
            )
            tls_insecure = tls.insecure
        will = None
        if self._will is not None:
            will = aiomqtt.Will(self._will.topic, encode(self._will.message), qos=1, retain=self._will.retain)
        connection = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            will=will,
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            tls_params=tls_params,
            tls_insecure=tls_insecure,
            socket_options=[_NODELAY],
            logger=log,
        )
        # paho's blocking TCP connect runs in a thread that a timeout cannot stop; bound it by our timeout so
        # that an abandoned attempt cannot connect later and take over this client id.
        connection._client.connect_timeout = self._connect_timeout_s  # noqa: SLF001
        return connection

    async def _open(self) -> aiomqtt.Client:
        """Connect, subscribe to every remembered filter, and mark the client connected."""
        where = self.address.display
        connection = self._connection_for()
        try:
            await asyncio.wait_for(connection.__aenter__(), self._connect_timeout_s + 1)
        except (aiomqtt.MqttError, asyncio.TimeoutError) as exc:
            # aiomqtt leaves the socket of a failed handshake open; paho closes it after sending DISCONNECT.
            connection._client.disconnect()  # noqa: SLF001
            if isinstance(exc, MqttConnectError):
                raise ControlError(
                    f"broker at {where} refused the connection: {exc} (check user name and password)"
                ) from exc
            reason = str(exc) if isinstance(exc, aiomqtt.MqttError) else f"no answer within {self._connect_timeout_s:g} s"
            raise ControlError(f"cannot reach broker at {where}: {reason}") from exc
        try:
            for topic_filter in self._filters:
                await self._subscribe(connection, topic_filter)
        except ControlError:
            with contextlib.suppress(aiomqtt.MqttError):
                await connection.__aexit__(None, None, None)
            raise
        self._connection = connection
        self._connected.set()
        return connection

    def _maintainer_ended(self, task: asyncio.Task[None]) -> None:
        """The receive loop only ends by close(); if it failed, end the client loudly rather than go deaf."""
        if task.cancelled() or task.exception() is None:
            return
        reason = f"stopped: its receive loop failed with {task.exception()!r}"
        log.error("control client %s %s", self.client_id, reason, exc_info=task.exception())
        self._closed = True
        self._connected.clear()
        self._inbox.end(reason)

    async def _maintain(self, connection: aiomqtt.Client) -> None:
        """Receive until the connection drops, then reconnect with backoff; runs until close()."""
        while True:
            try:
                async for raw in connection.messages:
                    self._accept(raw)
            except aiomqtt.MqttError as exc:
                log.warning("control client %s lost broker %s: %s; reconnecting", self.client_id, self.address.display, exc)
            self._connected.clear()
            self._connection = None
            with contextlib.suppress(aiomqtt.MqttError):
                await connection.__aexit__(None, None, None)
            connection = await self._reconnect()

    async def _reconnect(self) -> aiomqtt.Client:
        delay = 0.05
        while True:
            try:
                connection = await self._open()
            except ControlError as exc:
                log.warning("control client %s: %s; retrying in %.2f s", self.client_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self._max_backoff_s)
                continue
            self.reconnects += 1
            log.info("control client %s reconnected to broker %s", self.client_id, self.address.display)
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
            message = decode(bytes(payload))
        except ControlError as exc:
            log.warning("dropping invalid control message on %s: %s", topic, exc)
            return
        self._inbox.put(Inbound(topic=topic, message=message, retained=raw.retain))
