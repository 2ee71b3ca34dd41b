"""The control client against real brokers: mosquitto (Debian's) and the embedded amqtt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time

import aiomqtt
import pytest

from engine.control import ControlClient, Topics, embedded_broker
from engine.control.broker import BrokerAddress, BrokerUser, find_mosquitto, free_port
from engine.control.messages import RunStage, Shutdown, StageDone, Status
from engine.control.signing import new_key
from engine.errors import ControlError

pytestmark = pytest.mark.integration
KEY = new_key()

BROKERS = [
    pytest.param(
        "mosquitto", marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
    ),
    "amqtt",
]
TOPICS = Topics(run_id="test-run")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def expect(client: ControlClient, what: str, timeout_s: float = 3.0):
    inbound = await client.receive(timeout_s)
    assert inbound is not None, f"no message within {timeout_s} s: expected {what}"
    return inbound


@pytest.mark.parametrize("kind", BROKERS)
def test_request_response_round_trip(kind):
    request = RunStage(
        request_id="r1", request={"prompt": "a cat"}, node="transformer", attempt=0, deadline_s=30, segment=1,
        send_to={"p2": 0},
    )
    reply = StageDone(
        request_id="r1", node="transformer", replica=0, attempt=0, timings={"denoise": 0.1}, edges={}, outputs=[],
        peak_rss_bytes=1 << 30,
    )

    async def scenario():
        async with embedded_broker(kind) as address:
            async with (
                ControlClient(address, key=KEY, client_id="controller") as controller,
                ControlClient(address, key=KEY, client_id="worker") as worker,
            ):
                await controller.subscribe(TOPICS.controller)
                await worker.subscribe(TOPICS.inbox("transformer", 0))
                await controller.publish(TOPICS.inbox("transformer", 0), request)
                got = await expect(worker, "run_stage")
                assert (got.topic, got.message, got.retained) == (TOPICS.inbox("transformer", 0), request, False)
                await worker.publish(TOPICS.controller, reply)
                answer = await expect(controller, "stage_done")
                assert answer.message == reply

    run(scenario())


@pytest.mark.parametrize("kind", BROKERS)
def test_retained_status_reaches_a_late_subscriber_until_cleared(kind):
    status = Status(node="decoder", replica=0, state="starting", pid=123, host="h")

    async def scenario():
        async with embedded_broker(kind) as address:
            async with ControlClient(address, key=KEY, client_id="worker") as worker:
                await worker.publish(TOPICS.status("decoder", 0), status, retain=True)
            async with ControlClient(address, key=KEY, client_id="late") as late:
                await late.subscribe(TOPICS.all_status)
                got = await expect(late, "the retained status")
                assert (got.topic, got.message, got.retained) == (TOPICS.status("decoder", 0), status, True)
                await late.clear_retained(TOPICS.status("decoder", 0))
            async with ControlClient(address, key=KEY, client_id="later") as later:
                await later.subscribe(TOPICS.all_status)
                assert await later.receive(0.3) is None

    run(scenario())


@pytest.mark.parametrize("kind", BROKERS)
def test_unsigned_forged_and_replayed_messages_are_dropped_counted_and_the_loop_goes_on(kind, caplog):
    captured: list[bytes] = []

    async def scenario():
        async with embedded_broker(kind) as address:
            async with (
                ControlClient(address, key=KEY, client_id="controller") as controller,
                ControlClient(address, key=new_key(), client_id="forger") as forger,
                aiomqtt.Client(address.host, address.port, identifier="rogue") as rogue,
            ):
                await controller.subscribe(TOPICS.controller)
                await rogue.subscribe(TOPICS.controller, qos=1)
                await controller.publish(TOPICS.controller, Shutdown(reason="genuine"))
                assert (await expect(controller, "the genuine message")).message == Shutdown(reason="genuine")
                async for raw in rogue.messages:  # what an eavesdropper captured
                    captured.append(raw.payload)
                    break
                for _ in range(3):
                    await rogue.publish(TOPICS.controller, b"\x80\x04 not json", qos=1)
                    await rogue.publish(TOPICS.controller, "[" * 5000 + "]" * 5000, qos=1)
                await rogue.publish(TOPICS.controller, captured[0], qos=1)  # the replay
                await forger.publish(TOPICS.controller, Shutdown(reason="forged"))
                await controller.publish(TOPICS.controller, Shutdown(reason="still alive"))
                got = await expect(controller, "the next genuine message")
                assert got.message == Shutdown(reason="still alive")
                assert got.sender == "controller"
                assert await controller.receive(0.3) is None
                return dict(controller.rejected)

    with caplog.at_level(logging.WARNING, logger="engine.control.client"):
        rejected = run(scenario())
    assert rejected == {"unsigned": 6, "replayed": 1, "bad signature": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(warnings) == 3, warnings  # once per sender and reason
    assert any("replayed" in w and "'controller'" in w for w in warnings), warnings
    assert any("bad signature" in w and "'forger'" in w for w in warnings), warnings


class DroppingProxy:
    """A TCP proxy in front of the broker whose connections the test can cut, like a network failure."""

    def __init__(self, target: BrokerAddress):
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> BrokerAddress:
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self._port = self.server.sockets[0].getsockname()[1]
        return BrokerAddress("127.0.0.1", self._port)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self.target.host, self.target.port)
        self.writers += [writer, upstream_writer]
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def go_away(self) -> None:
        """Cut every connection and refuse new ones, as a broker that is down."""
        assert self.server is not None
        self.server.close()
        self.drop()
        await self.server.wait_closed()

    async def come_back(self) -> None:
        assert self.server is not None
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", self._port)

    def drop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    def close(self) -> None:
        self.drop()
        assert self.server is not None
        self.server.close()


@contextlib.asynccontextmanager
async def behind_a_proxy(kind: str, proxied: str, direct: str, max_backoff_s: float):
    """A client ``proxied`` through a :class:`DroppingProxy` and a client ``direct`` on an embedded broker."""
    async with embedded_broker(kind) as address:
        proxy = DroppingProxy(address)
        via_proxy = await proxy.start()
        try:
            async with (
                ControlClient(via_proxy, key=KEY, client_id=proxied, max_backoff_s=max_backoff_s) as through,
                ControlClient(address, key=KEY, client_id=direct) as straight,
            ):
                yield through, straight, proxy
        finally:
            proxy.close()


def test_a_broker_away_is_said_once_and_a_retained_message_posted_meanwhile_arrives_once(caplog):
    """An agent between runs: its broker away for a while, an announcement posted meanwhile (retained). The retry
    is logged once, not at every try; after the reconnect the retained messages are said again, the one posted
    meanwhile once, and no receiver takes one for a replay."""
    def status(node: str) -> Status:
        return Status(node=node, replica=0, state="loading", pid=1, host="h1")

    async def scenario():
        async with behind_a_proxy("amqtt", "agent-h1", "observer", max_backoff_s=0.1) as (agent, observer, proxy):
            await observer.subscribe(TOPICS.all_status)
            await agent.publish(TOPICS.status("before", 0), status("before"), retain=True)
            first = await expect(observer, "the announcement made before the broker went away")
            await proxy.go_away()
            await asyncio.sleep(0.3)
            agent.post(TOPICS.status("meanwhile", 0), status("meanwhile"), retain=True)
            await asyncio.sleep(1.0)  # ~10 failed tries
            await proxy.come_back()
            heard = [first]
            while (inbound := await observer.receive(1.0)) is not None:
                heard.append(inbound)
            return [h.message.node for h in heard], dict(observer.rejected), agent.reconnects

    with caplog.at_level(logging.DEBUG, logger="engine.control.client"):
        heard, rejected, reconnects = run(scenario())
    assert sorted(heard) == ["before", "before", "meanwhile"] and rejected == {} and reconnects == 1
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "retrying quietly" in r.getMessage()]
    tried = [r for r in caplog.records if "retrying quietly" in r.getMessage()]
    assert len(said) == 1 and len(tried) > 3, [r.getMessage() for r in tried]


@pytest.mark.parametrize("kind", BROKERS)
def test_reconnects_and_subscribes_again_after_losing_the_connection(kind):
    async def wait_until(condition, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
            await asyncio.sleep(0.01)

    async def scenario():
        async with behind_a_proxy(kind, "worker", "controller", max_backoff_s=0.2) as (worker, controller, proxy):
            await worker.subscribe(TOPICS.inbox("w", 0))
            proxy.drop()
            await wait_until(lambda: worker.reconnects == 1 and worker.connected, "worker reconnected", 5)
            await controller.publish(TOPICS.inbox("w", 0), Shutdown(reason="after reconnect"))
            got = await expect(worker, "a message on the re-subscribed inbox")
            assert got.message == Shutdown(reason="after reconnect")

    run(scenario())


def test_unreachable_broker_fails_fast_with_the_address():
    port = free_port()

    async def scenario():
        started = time.monotonic()
        with pytest.raises(ControlError, match=f"cannot reach broker at 127.0.0.1:{port}"):
            async with ControlClient(key=KEY, address=BrokerAddress("127.0.0.1", port), client_id="c", connect_timeout_s=2):
                pass
        return time.monotonic() - started

    assert run(scenario()) < 3


def test_silent_broker_times_out_within_the_connect_timeout():
    async def scenario():
        closed_by_client = asyncio.Event()

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1024):
                pass
            closed_by_client.set()
            writer.close()

        # A listener that accepts TCP but never answers the MQTT CONNECT.
        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        try:
            with pytest.raises(ControlError, match=f"cannot reach broker at 127.0.0.1:{port}"):
                async with ControlClient(key=KEY, address=BrokerAddress("127.0.0.1", port), client_id="c", connect_timeout_s=1):
                    pass
            elapsed = time.monotonic() - started
            await asyncio.wait_for(closed_by_client.wait(), 2)  # the abandoned attempt leaves no open socket
        finally:
            server.close()
        return elapsed

    assert run(scenario()) < 3


@pytest.mark.parametrize("kind", BROKERS)
def test_username_and_password(kind):
    async def scenario():
        async with embedded_broker(kind, users=[BrokerUser("alice", "s3cret")]) as anonymous:
            address = anonymous.as_user(BrokerUser("alice", "s3cret"))
            async with ControlClient(address, key=KEY, client_id="alice") as client:
                await client.subscribe(TOPICS.controller)
                await client.publish(TOPICS.controller, Shutdown(reason="authenticated"))
                assert (await expect(client, "own message")).message == Shutdown(reason="authenticated")
            for name, wrong in [
                ("wrong password", BrokerAddress(address.host, address.port, username="alice", password="nope")),
                ("anonymous", BrokerAddress(address.host, address.port)),
            ]:
                with pytest.raises(ControlError, match="refused the connection") as info:
                    async with ControlClient(wrong, key=KEY, client_id="mallory"):
                        pass
                assert "127.0.0.1" in str(info.value), name

    run(scenario())


@pytest.mark.parametrize("kind", BROKERS)
def test_embedded_broker_is_gone_after_the_block_also_when_cancelled(kind):
    ports: list[int] = []

    async def hold() -> None:
        async with embedded_broker(kind) as address:
            ports.append(address.port)
            await asyncio.sleep(60)

    async def scenario():
        async with embedded_broker(kind) as address:
            assert accepts(address.port)
        assert not accepts(address.port)
        task = asyncio.create_task(hold())
        while not ports:
            await asyncio.sleep(0.01)
        assert accepts(ports[0])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not accepts(ports[0])

    run(scenario())


def test_forcing_mosquitto_without_it_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("engine.control.broker.find_mosquitto", lambda: None)

    async def scenario():
        with pytest.raises(ControlError, match="mosquitto is not installed"):
            async with embedded_broker("mosquitto"):
                pass

    run(scenario())


@pytest.mark.parametrize("kind", BROKERS)
def test_closed_client_refuses_to_publish_and_ends_its_iterator(kind):
    async def scenario():
        async with embedded_broker(kind) as address:
            client = ControlClient(address, key=KEY, client_id="c")
            await client.connect()
            await client.close()
            with pytest.raises(ControlError, match="'c' was closed"):
                await client.publish(TOPICS.controller, Shutdown(reason="late"))
            assert [inbound async for inbound in client.messages()] == []
            with pytest.raises(ControlError, match="'c' was closed"):
                await client.receive(1)

    run(scenario())


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_embedded_mosquitto_dies_with_a_killed_parent():
    parent = subprocess.Popen(
        [
            sys.executable, "-c",
            "import asyncio\n"
            "from engine.control import embedded_broker\n"
            "async def main():\n"
            "    async with embedded_broker('mosquitto') as address:\n"
            "        print(address.port, flush=True)\n"
            "        await asyncio.sleep(60)\n"
            "asyncio.run(main())\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        port = int(parent.stdout.readline())
        assert accepts(port)
    finally:
        parent.kill()
        parent.wait(timeout=5)
    deadline = time.monotonic() + 3
    while accepts(port):
        assert time.monotonic() < deadline, f"mosquitto on port {port} outlived its killed parent by 3 s"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_failing_receive_loop_ends_the_client_loudly(kind, monkeypatch, caplog):
    def broken(self, raw):
        raise RuntimeError("bug in message handling")

    async def scenario():
        async with embedded_broker(kind) as address:
            async with ControlClient(address, key=KEY, client_id="deafened") as client:
                await client.subscribe(TOPICS.controller)
                monkeypatch.setattr(ControlClient, "_accept", broken)
                client.post(TOPICS.controller, Shutdown(reason="trigger"))
                with pytest.raises(ControlError, match="receive loop failed with RuntimeError"):
                    await client.receive(3)
                assert not client.connected

    run(scenario())
    assert "bug in message handling" in caplog.text


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_embedded_mosquitto_confines_each_user_to_its_topics():
    topics = Topics(run_id="acl")
    users = [BrokerUser.generate(topics.controller_client, topics.controller_acl),
             *(BrokerUser.generate(topics.replica_client("w", r), topics.replica_acl("w", r)) for r in (0, 1))]

    async def scenario():
        async with embedded_broker("mosquitto", users=users) as broker:
            controller_user, w0, w1 = users
            async with (
                ControlClient(broker.as_user(controller_user), key=KEY, client_id=controller_user.name) as controller,
                ControlClient(broker.as_user(w0), key=KEY, client_id=w0.name) as worker0,
                ControlClient(broker.as_user(w1), key=KEY, client_id=w1.name) as worker1,
            ):
                await worker0.subscribe(topics.inbox("w", 0))
                await worker0.subscribe(topics.inbox("w", 1))  # not its inbox: the broker delivers nothing there
                await worker1.subscribe(topics.inbox("w", 1))
                await controller.publish(topics.inbox("w", 1), Shutdown(reason="for w1 only"))
                assert (await expect(worker1, "its own order")).message == Shutdown(reason="for w1 only")
                assert await worker0.receive(0.5) is None
                await controller.subscribe(topics.all_status)
                await worker1.publish(topics.status("w", 0), Shutdown(reason="posing as w0"))  # not its topic
                assert await controller.receive(0.5) is None
            for name, address in [("anonymous", broker), ("wrong password", broker.as_user(BrokerUser(w0.name, "nope")))]:
                with pytest.raises(ControlError, match="refused the connection"):
                    async with ControlClient(address, key=KEY, client_id=w0.name):
                        pass

    run(scenario())
