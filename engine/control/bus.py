"""The control bus interface: what the runtime needs from the control plane, in five methods.

:class:`engine.control.client.ControlClient` implements it over MQTT; :class:`engine.control.memory.MemoryBus`
implements it in memory for unit tests of the runtime.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine.control.messages import Message
from engine.errors import ControlError


@dataclass(frozen=True)
class LastWill:
    """What the broker publishes when a client's connection dies without a clean disconnect.

    Keep ``retain`` off on amqtt: its retained will is delivered to the next subscriber of any topic.
    """

    topic: str
    message: Message
    retain: bool = False


@dataclass(frozen=True)
class Inbound:
    """A received control message whose signature, freshness and schema were checked."""

    topic: str
    message: Message
    retained: bool
    sender: str  #: the client id that signed it


class ControlBus(Protocol):
    rejected: Counter[str]  #: received messages dropped, by reason
    reconnects: int  #: connections to the broker re-established after a loss

    @property
    def connected(self) -> bool:
        """Whether the broker hears us now."""

    async def connect(self) -> None:
        """Connect (ControlError if the broker cannot be reached); then stay connected."""

    async def close(self) -> None:
        """Disconnect cleanly and end ``receive`` / ``messages``."""

    async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait until the broker has it; BrokerLost if the broker stays away too long."""

    def post(self, topic: str, message: Message, *, retain: bool = False) -> None:
        """Publish without waiting; sent in order by the bus, which ends (BrokerLost) if it never can be."""

    async def clear_retained(self, topic: str) -> None:
        """Remove the retained message of a topic."""

    async def subscribe(self, topic_filter: str) -> None:
        """Subscribe (MQTT filter syntax); retained messages of matching topics follow."""

    def forget_sender(self, sender: str) -> None:
        """Accept ``sender``'s sequence numbers from 0 again: it was started again (engine.control.signing)."""

    async def receive(self, timeout_s: float) -> Inbound | None:
        """The next message, or None if none arrived within ``timeout_s``; ControlError once the bus is closed."""

    def nudge(self) -> None:
        """Make a ``receive`` that waits now (or the next one) return None at once: its reader has work."""

    def messages(self) -> AsyncIterator[Inbound]:
        """Every received message until the bus is closed."""


class InboxQueue:
    """Received messages in arrival order; once the bus ends, readers get what was queued, then the end. A nudge
    ends one wait early, as a timeout would."""

    _NUDGE = object()

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  #: Inbound, _NUDGE, or None (the end)
        self._ended: ControlError | None = None

    def put(self, inbound: Inbound) -> None:
        self._queue.put_nowait(inbound)

    def nudge(self) -> None:
        if self._ended is None:
            self._queue.put_nowait(self._NUDGE)

    def end(self, error: ControlError) -> None:
        """No more messages; readers get what was queued, then ``error``."""
        if self._ended is None:
            self._ended = error
            self._queue.put_nowait(None)

    async def get(self, timeout_s: float) -> Inbound | None:
        """The next message; None on timeout or a nudge; ControlError once the bus has ended."""
        if self._queue.empty():
            try:
                async with asyncio.timeout(timeout_s):  # never wait_for (tests/unit/test_cancellation.py)
                    inbound = await self._queue.get()
            except TimeoutError:
                return None
        else:
            inbound = self._queue.get_nowait()
        if inbound is self._NUDGE:
            return None
        if inbound is None:
            self._queue.put_nowait(None)  # keep the end marker for every other reader
            assert self._ended is not None
            raise self._ended
        return inbound

    async def __aiter__(self) -> AsyncIterator[Inbound]:
        while (inbound := await self._queue.get()) is not None:
            if inbound is not self._NUDGE:
                yield inbound
        self._queue.put_nowait(None)
