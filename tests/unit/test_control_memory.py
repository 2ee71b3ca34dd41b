"""The in-memory control bus: same behaviour as the MQTT client, no sockets."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import engine.control
from engine.control import ControlBus, ControlClient, LastWill, Topics
from engine.control.memory import MemoryBroker, MemoryBus
from engine.control.messages import Shutdown, Status
from engine.errors import ControlError

TOPICS = Topics(run_id="r")


def status(state: str) -> Status:
    return Status(node="decoder", replica=0, state=state, pid=9, host="h", detail="connection lost")  # type: ignore[arg-type]


def test_both_buses_have_the_protocol_methods_with_the_same_signatures():
    for name in ("publish", "clear_retained", "subscribe", "receive", "nudge", "messages"):
        expected = inspect.signature(getattr(ControlBus, name))
        assert inspect.signature(getattr(ControlClient, name)) == expected, name
        assert inspect.signature(getattr(MemoryBus, name)) == expected, name


def test_public_surface():
    assert sorted(engine.control.__all__) == sorted(
        [
            "BrokerAddress", "ControlBus", "ControlClient", "EmbeddedBroker", "Inbound", "LastWill",
            "LivenessMonitor", "Message", "Progress", "TLSOptions", "Topics", "Trouble", "decode",
            "embedded_broker", "encode", "parse_broker", "publish_heartbeats",
        ]
    )
    assert all(hasattr(engine.control, name) for name in engine.control.__all__)


def test_publish_reaches_matching_subscribers_only():
    async def scenario():
        broker = MemoryBroker()
        async with broker.connect("a") as a, broker.connect("b") as b, broker.connect("c") as c:
            await b.subscribe(f"{TOPICS.root}/in/+/+")
            await c.subscribe(TOPICS.controller)
            await a.publish(TOPICS.inbox("transformer", 1), Shutdown(reason="x"))
            got = await b.receive(1)
            assert got is not None and (got.topic, got.message, got.retained) == (
                TOPICS.inbox("transformer", 1), Shutdown(reason="x"), False,
            )
            assert await c.receive(0.01) is None
            assert await a.receive(0.01) is None

    asyncio.run(scenario())


def test_retained_reaches_late_subscribers_until_cleared():
    async def scenario():
        broker = MemoryBroker()
        async with broker.connect("worker") as worker:
            await worker.publish(TOPICS.status("decoder", 0), status("starting"), retain=True)
        async with broker.connect("late") as late:
            await late.subscribe(TOPICS.all_status)
            got = await late.receive(1)
            assert got is not None and got.retained and got.message == status("starting")
            await late.clear_retained(TOPICS.status("decoder", 0))
        async with broker.connect("later") as later:
            await later.subscribe(TOPICS.all_status)
            assert await later.receive(0.01) is None

    asyncio.run(scenario())


def test_kill_publishes_the_will_and_a_clean_close_does_not():
    async def scenario():
        broker = MemoryBroker()
        will = LastWill(TOPICS.status("decoder", 0), status("dead"))
        async with broker.connect("controller") as controller:
            await controller.subscribe(TOPICS.all_status)
            async with broker.connect("polite", will=will):
                pass
            assert await controller.receive(0.01) is None
            doomed = broker.connect("doomed", will=will)
            broker.kill("doomed")
            got = await controller.receive(1)
            assert got is not None and got.message == status("dead")
            with pytest.raises(ControlError, match="'doomed' is closed"):
                await doomed.publish(TOPICS.controller, Shutdown(reason="too late"))
            assert [m async for m in doomed.messages()] == []
            with pytest.raises(ControlError, match="'doomed' was killed"):
                await doomed.receive(1)

    asyncio.run(scenario())


def test_client_ids_are_unique():
    broker = MemoryBroker()
    broker.connect("worker-0")
    with pytest.raises(ControlError, match="already connected"):
        broker.connect("worker-0")


def test_receive_with_zero_timeout_drains_what_is_queued():
    async def scenario():
        broker = MemoryBroker()
        async with broker.connect("a") as a:
            await a.subscribe(TOPICS.controller)
            for n in range(3):
                await a.publish(TOPICS.controller, Shutdown(reason=str(n)))
            drained = []
            while (inbound := await a.receive(0)) is not None:
                drained.append(inbound.message.reason)
            assert drained == ["0", "1", "2"]

    asyncio.run(scenario())


def test_a_nudge_ends_a_wait_at_once_and_loses_no_message():
    async def scenario():
        broker = MemoryBroker()
        async with broker.connect("a") as a:
            await a.subscribe(TOPICS.controller)
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, a.nudge)
            started = loop.time()
            assert await a.receive(30) is None and loop.time() - started < 5  # woken, not timed out
            await a.publish(TOPICS.controller, Shutdown(reason="after"))
            a.nudge()
            first = await a.receive(0)  # the message came before the nudge: it comes first
            assert first is not None and first.message.reason == "after"
            assert await a.receive(0) is None  # the nudge
            a.nudge()
            await a.publish(TOPICS.controller, Shutdown(reason="streamed"))
            await a.close()
            assert [inbound.message.reason async for inbound in a.messages()] == ["streamed"]  # nudges skipped

    asyncio.run(scenario())
