"""Cancelling a loop stops it, even when a message arrives in the same instant.

Python 3.11's ``asyncio.wait_for`` loses a cancel that comes in the loop iteration in which what it waits on
completes (fixed in 3.12). A loop that waited on it went on after ``cancel()``, and whatever awaited the loop
waited forever: ``engine run`` once hung after its last request, when the agents' reports came in just as the
run stopped following them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from engine.control.bus import Inbound, InboxQueue
from engine.control.memory import MemoryBroker
from engine.control.messages import Shutdown
from engine.control.topics import AgentTopics
from engine.controller.remote import RemoteLauncher

REPO = Path(__file__).resolve().parents[2]
TRIES = 20


def test_a_reader_cancelled_as_a_message_arrives_ends_and_leaves_the_message_queued():
    async def run() -> tuple[int, int]:
        ended = kept = 0
        for _ in range(TRIES):
            inbox = InboxQueue()
            reader = asyncio.create_task(inbox.get(5))
            await asyncio.sleep(0)  # the reader waits
            inbox.put(Inbound(topic="t", message=Shutdown(reason="x"), retained=False, sender="s"))
            reader.cancel()
            await asyncio.wait([reader], timeout=1)
            ended += reader.cancelled()
            kept += (await inbox.get(0)) is not None
        return ended, kept

    assert asyncio.run(run()) == (TRIES, TRIES)


def test_the_agents_follower_stops_when_cancelled_as_a_report_arrives():
    broker = MemoryBroker()
    topics = AgentTopics()

    async def run() -> int:
        stopped = 0
        agent = broker.connect("agent-h1")
        for attempt in range(TRIES):
            launcher = RemoteLauncher(broker.connect(f"run{attempt}-deployer"), f"run{attempt}", {"transformer": "h1"},
                                      lease_s=60)
            serving = asyncio.create_task(launcher.serve())
            await asyncio.sleep(0.01)  # subscribed, waiting for a message
            await agent.publish(topics.birth("h1"), Shutdown(reason="any message wakes the follower"))
            serving.cancel()
            done, _ = await asyncio.wait([serving], timeout=1)
            stopped += bool(done)
        return stopped

    assert asyncio.run(run()) == TRIES


def test_the_engine_never_waits_with_asyncio_wait_for():
    """It loses cancels on Python 3.11: ``async with asyncio.timeout(...)`` does the job without that fault."""
    uses = [f"{path.relative_to(REPO)}:{number}" for folder in ("engine", "nodes", "bench")
            for path in sorted((REPO / folder).rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bwait_for\(", line)
            and not line.lstrip().startswith(("def ", "#"))]
    assert uses == [], f"asyncio.wait_for is used at {', '.join(uses)}: use asyncio.timeout"
