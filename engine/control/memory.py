"""An in-memory twin of the MQTT control plane, for unit tests of the runtime (no sockets, no processes).

``MemoryBroker`` keeps retained messages and routes publishes to subscribers with MQTT filter matching;
``MemoryBroker.kill`` plays a process dying (its last will is published), ``MemoryBroker.inject`` puts raw
bytes on a topic as an outsider would. Every message is sealed and opened as the real client does it (under
the broker's run key), so the twin checks the wire format and the signatures exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType

from aiomqtt import Topic

from engine.control.bus import Inbound, InboxQueue, LastWill
from engine.control.messages import Message
from engine.control.signing import Opener, Rejected, Sealer, new_key
from engine.errors import ControlError


class MemoryBroker:
    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else new_key()
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
        bus._end(ControlError(f"control client {client_id!r} was killed"))  # noqa: SLF001
        if bus.will is not None:
            self.route(bus.will.topic, bus.sealer.seal(bus.will.topic, bus.will.message), retain=bus.will.retain)

    def inject(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Put raw bytes on a topic, as any client of the broker could."""
        self.route(topic, payload, retain=retain)

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
        self.sealer = Sealer(broker.key, client_id)
        self._opener = Opener(broker.key)
        self._broker = broker
        self._filters: list[str] = []
        self._inbox = InboxQueue()
        self._closed = False
        self.rejected: Counter[str] = Counter()
        self.reconnects = 0  # a memory bus never loses its broker

    @property
    def connected(self) -> bool:
        return not self._closed

    async def connect(self) -> None:
        """Connected from the start (``MemoryBroker.connect``)."""

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
            self._end(ControlError(f"control client {self.client_id!r} was closed"))

    async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
        self.post(topic, message, retain=retain)

    def post(self, topic: str, message: Message, *, retain: bool = False) -> None:
        self._check_open(f"publishing {message.kind!r} to {topic}")
        self._broker.route(topic, self.sealer.seal(topic, message), retain=retain)

    async def clear_retained(self, topic: str) -> None:
        self._check_open(f"clearing the retained message of {topic}")
        self._broker.route(topic, b"", retain=True)

    async def subscribe(self, topic_filter: str) -> None:
        self._check_open(f"subscribing to {topic_filter}")
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        for topic, payload in self._broker.retained(topic_filter):
            self._accept(topic, payload, retained=True)

    def forget_sender(self, sender: str) -> None:
        self._opener.forget(sender)

    async def receive(self, timeout_s: float) -> Inbound | None:
        return await self._inbox.get(timeout_s)

    def nudge(self) -> None:
        self._inbox.nudge()

    async def messages(self) -> AsyncIterator[Inbound]:
        async for inbound in self._inbox:
            yield inbound

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ControlError(f"{what}: control client {self.client_id!r} is closed")

    def _deliver(self, topic: str, payload: bytes) -> None:
        if any(Topic(topic).matches(topic_filter) for topic_filter in self._filters):
            self._accept(topic, payload, retained=False)

    def _accept(self, topic: str, payload: bytes, *, retained: bool) -> None:
        try:
            opened = self._opener.open(topic, payload)
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            return
        self._inbox.put(Inbound(topic=topic, message=opened.message, retained=retained, sender=opened.sender))

    def _end(self, error: ControlError) -> None:
        self._closed = True
        self._inbox.end(error)
