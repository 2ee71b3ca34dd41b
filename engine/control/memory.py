"""An in-memory twin of the MQTT control plane, for unit tests of the runtime (no sockets, no processes).

``MemoryBroker`` keeps retained messages and routes publishes to subscribers with MQTT filter matching;
``MemoryBroker.kill`` plays a process dying (its last will is published). Every message goes through
``encode``/``decode`` on the way, so the twin checks the wire format exactly as the real client does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

from aiomqtt import Topic

from engine.control.bus import Inbound, InboxQueue, LastWill
from engine.control.messages import Message, decode, encode
from engine.errors import ControlError


class MemoryBroker:
    def __init__(self) -> None:
        self._clients: dict[str, MemoryBus] = {}
        self._retained: dict[str, bytes] = {}

    def connect(self, client_id: str, *, will: LastWill | None = None) -> MemoryBus:
        if client_id in self._clients:
            raise ControlError(f"client id {client_id!r} is already connected; client ids must be unique")
        bus = MemoryBus(self, client_id, will)
        self._clients[client_id] = bus
        return bus

    def kill(self, client_id: str) -> None:
        """The client's process dies: it is disconnected and its last will is published."""
        bus = self._clients.pop(client_id)
        bus._end("was killed")  # noqa: SLF001
        if bus.will is not None:
            self.route(bus.will.topic, encode(bus.will.message), retain=bus.will.retain)

    def disconnect(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def route(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        if not payload:
            return
        for bus in self._clients.values():
            bus._deliver(topic, payload)  # noqa: SLF001

    def retained(self, topic_filter: str) -> list[tuple[str, bytes]]:
        return [(topic, payload) for topic, payload in self._retained.items() if Topic(topic).matches(topic_filter)]


class MemoryBus:
    """A connected client of a :class:`MemoryBroker`; implements :class:`engine.control.bus.ControlBus`."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: LastWill | None):
        self.client_id = client_id
        self.will = will
        self._broker = broker
        self._filters: list[str] = []
        self._inbox = InboxQueue(client_id)
        self._closed = False

    async def __aenter__(self) -> MemoryBus:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly: no last will."""
        if not self._closed:
            self._broker.disconnect(self.client_id)
            self._end("was closed")

    async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
        self._check_open(f"publishing {message.kind!r} to {topic}")
        self._broker.route(topic, encode(message), retain=retain)

    async def clear_retained(self, topic: str) -> None:
        self._check_open(f"clearing the retained message of {topic}")
        self._broker.route(topic, b"", retain=True)

    async def subscribe(self, topic_filter: str) -> None:
        self._check_open(f"subscribing to {topic_filter}")
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        for topic, payload in self._broker.retained(topic_filter):
            self._inbox.put(Inbound(topic=topic, message=decode(payload), retained=True))

    async def receive(self, timeout_s: float) -> Inbound | None:
        return await self._inbox.get(timeout_s)

    async def messages(self) -> AsyncIterator[Inbound]:
        async for inbound in self._inbox:
            yield inbound

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ControlError(f"{what}: control client {self.client_id!r} is closed")

    def _deliver(self, topic: str, payload: bytes) -> None:
        if any(Topic(topic).matches(topic_filter) for topic_filter in self._filters):
            self._inbox.put(Inbound(topic=topic, message=decode(payload), retained=False))

    def _end(self, reason: str) -> None:
        self._closed = True
        self._inbox.end(reason)
