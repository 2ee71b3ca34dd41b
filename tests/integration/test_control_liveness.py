"""Liveness with real worker processes: the last will on SIGKILL, missing heartbeats on SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from engine.control import ControlClient, LivenessMonitor, Topics, embedded_broker
from engine.control.broker import BrokerAddress, find_mosquitto
from engine.control.heartbeat import WILL_GRACE_S
from engine.control.messages import Heartbeat, Status
from engine.control.signing import new_key

pytestmark = pytest.mark.integration
KEY = new_key()

BROKERS = [
    pytest.param(
        "mosquitto", marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
    ),
    "amqtt",
]
REPO = Path(__file__).resolve().parents[2]

# A minimal worker: last will, retained status, heartbeats from a busy compute loop.
WORKER = """
import asyncio, os, socket, sys
from engine.control import ControlClient, LastWill, Progress, Topics, publish_heartbeats
from engine.control.broker import BrokerAddress
from engine.control.messages import Status

async def main(host, port, run_id, key):
    topics, node, replica = Topics(run_id=run_id), "worker", 0
    def status(state, detail=None):
        return Status(node=node, replica=replica, state=state, pid=os.getpid(), host=socket.gethostname(), detail=detail)
    will = LastWill(topics.status(node, replica), status("dead", "connection lost"))
    async with ControlClient(key=bytes.fromhex(key), address=BrokerAddress(host, int(port)), client_id=f"{run_id}-{node}-{replica}", will=will) as client:
        await client.publish(topics.status(node, replica), status("starting"), retain=True)
        progress = Progress()
        progress.stage_started("r1", "denoise", 1000)
        beats = asyncio.create_task(
            publish_heartbeats(client, topics.heartbeat(node, replica), node, replica, progress, period_s=0.1)
        )
        for step in range(1000):
            progress.step_done(step)
            await asyncio.sleep(0.05)
        beats.cancel()

asyncio.run(main(*sys.argv[1:]))
"""


@asynccontextmanager
async def worker_process(address: BrokerAddress, run_id: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, address.host, str(address.port), run_id, KEY.hex()],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        yield process
    finally:
        process.kill()  # also ends a stopped process
        process.wait(timeout=5)


async def first_heartbeat(controller: ControlClient, monitor: LivenessMonitor, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inbound = await controller.receive(0.1)
        if inbound is not None and isinstance(inbound.message, Heartbeat | Status):
            monitor.observe(inbound.message)
            if isinstance(inbound.message, Heartbeat):
                return
    raise AssertionError(f"no heartbeat from the worker process within {timeout_s} s")


async def controller_for(address: BrokerAddress, topics: Topics) -> ControlClient:
    controller = ControlClient(address, key=KEY, client_id=f"{topics.run_id}-controller")
    await controller.connect()
    await controller.subscribe(topics.all_status)
    await controller.subscribe(topics.all_heartbeats)
    return controller


@pytest.mark.parametrize("kind", BROKERS)
def test_last_will_announces_a_killed_worker(kind):
    topics = Topics(run_id=f"will-{kind}")

    async def scenario() -> tuple[float, float]:
        async with embedded_broker(kind) as address:
            controller = await controller_for(address, topics)
            monitor = LivenessMonitor(heartbeat_timeout_s=30)
            try:
                async with worker_process(address, topics.run_id) as process:
                    await first_heartbeat(controller, monitor)
                    killed = time.monotonic()
                    process.send_signal(signal.SIGKILL)
                    will, judged = None, None
                    while judged is None and time.monotonic() - killed < WILL_GRACE_S + 3:
                        inbound = await controller.receive(0.1)
                        if inbound is not None and isinstance(inbound.message, Heartbeat | Status):
                            monitor.observe(inbound.message)
                            if isinstance(inbound.message, Status) and inbound.message.state == "dead":
                                will = inbound
                                arrived = time.monotonic() - killed
                        if monitor.check():
                            judged = time.monotonic() - killed
                    assert will is not None and will.message.pid == process.pid
                    assert will.topic == topics.status("worker", 0)
                    [trouble] = monitor.check()
                    assert (trouble.node, trouble.replica, trouble.problem) == ("worker", 0, "dead")
                    assert trouble.detail == "dead: connection lost"
                    return arrived, judged
            finally:
                await controller.close()

    arrived, judged = asyncio.run(scenario())
    assert arrived < 2  # the broker publishes the will at once
    assert WILL_GRACE_S <= judged - arrived + 0.2 and judged < WILL_GRACE_S + 2.5  # believed once no heartbeat followed


@pytest.mark.parametrize("kind", BROKERS)
def test_stopped_worker_is_detected_by_missing_heartbeats(kind):
    topics = Topics(run_id=f"stuck-{kind}")
    timeout_s = 0.6

    async def scenario() -> float:
        async with embedded_broker(kind) as address:
            controller = await controller_for(address, topics)
            monitor = LivenessMonitor(heartbeat_timeout_s=timeout_s, stall_timeout_s=timeout_s)
            try:
                async with worker_process(address, topics.run_id) as process:
                    await first_heartbeat(controller, monitor)
                    for _ in range(10):  # a healthy, progressing worker is not in trouble
                        inbound = await controller.receive(0.1)
                        if inbound is not None and isinstance(inbound.message, Heartbeat | Status):
                            monitor.observe(inbound.message)
                        assert monitor.check() == []
                    process.send_signal(signal.SIGSTOP)
                    stopped = time.monotonic()
                    while not monitor.check() and time.monotonic() - stopped < 5:
                        inbound = await controller.receive(0.05)
                        if inbound is not None and isinstance(inbound.message, Heartbeat | Status):
                            monitor.observe(inbound.message)
                    [trouble] = monitor.check()
                    assert (trouble.node, trouble.replica, trouble.problem) == ("worker", 0, "silent")
                    return time.monotonic() - stopped
            finally:
                await controller.close()

    detected_after = asyncio.run(scenario())
    assert timeout_s - 0.15 < detected_after < timeout_s + 0.5
