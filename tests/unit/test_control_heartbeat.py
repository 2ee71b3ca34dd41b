"""Progress counters shared across threads, and the liveness monitor's verdicts on a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from engine.control.heartbeat import WILL_GRACE_S, LivenessMonitor, Progress, heartbeat, publish_heartbeats, rss_bytes
from engine.control.memory import MemoryBroker
from engine.control.messages import Heartbeat, Message, Status
from engine.errors import BrokerLost


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(node: str = "transformer", replica: int = 0, *, request_id: str | None = None, step: int = 0, done: int = 0):
    return Heartbeat(
        node=node, replica=replica, seq=0, request_id=request_id, stage="denoise" if request_id else None, step=step,
        total_steps=10 if request_id else 0, requests_done=done, rss_bytes=1, rejected=0, time=0.0,
    )


def status(state: str, detail: str | None = None, node: str = "transformer", replica: int = 0) -> Status:
    return Status(node=node, replica=replica, state=state, pid=1, host="h", detail=detail)  # type: ignore[arg-type]


def test_progress_lifecycle():
    progress = Progress()
    progress.stage_started("r1", "denoise", 50)
    progress.step_done(3)
    snap = progress.snapshot()
    assert (snap.request_id, snap.stage, snap.step, snap.total_steps, snap.requests_done) == ("r1", "denoise", 3, 50, 0)
    progress.request_finished()
    snap = progress.snapshot()
    assert (snap.request_id, snap.stage, snap.step, snap.requests_done) == (None, None, 0, 1)


def test_progress_is_consistent_under_concurrent_writers():
    progress = Progress()

    def work(worker: int) -> None:
        for i in range(500):
            progress.stage_started(f"r{worker}-{i}", "denoise", 10)
            progress.step_done(5)
            progress.request_finished()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert progress.snapshot().requests_done == 2000


def test_heartbeat_carries_the_snapshot_and_memory():
    progress = Progress()
    progress.stage_started("r9", "vae_decode", 1)
    message = heartbeat("decoder", 1, 7, progress.snapshot())
    assert (message.node, message.replica, message.seq, message.request_id, message.stage) == (
        "decoder", 1, 7, "r9", "vae_decode",
    )
    assert message.rss_bytes == pytest.approx(rss_bytes(), rel=0.5)
    assert message.rss_bytes > 1_000_000


def test_fresh_heartbeats_mean_no_trouble():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=3, clock=clock)
    for _ in range(10):
        monitor.observe(beat())
        clock.now += 1
    assert monitor.check() == []


def test_silent_replica_is_reported_after_the_timeout_only():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=3, clock=clock)
    monitor.observe(beat())
    clock.now += 2.9
    assert monitor.check() == []
    clock.now += 0.2
    [trouble] = monitor.check()
    assert (trouble.node, trouble.replica, trouble.problem) == ("transformer", 0, "silent")
    assert str(trouble) == "node 'transformer' replica 0: no heartbeat for 3.1 s (heartbeat timeout 3 s)"


def test_expected_replica_that_never_beats_is_silent():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=1, clock=clock)
    monitor.expect("decoder", 0)
    clock.now += 1.5
    [trouble] = monitor.check()
    assert trouble.problem == "silent"
    assert "no heartbeat at all" in trouble.detail


def test_last_will_marks_dead_once_no_heartbeat_follows_and_a_restart_revives():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=30, clock=clock)
    monitor.observe(beat())
    monitor.observe(status("dead", "connection lost"))
    assert monitor.check() == []  # not yet: a broker going down publishes every will
    clock.now += WILL_GRACE_S + 0.1
    [trouble] = monitor.check()
    assert trouble.problem == "dead"
    assert str(trouble) == "node 'transformer' replica 0: dead: connection lost"
    monitor.observe(status("starting"))
    monitor.observe(beat())
    assert monitor.check() == []


def test_a_will_followed_by_heartbeats_is_a_broker_going_down_not_a_death():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=30, clock=clock)
    monitor.observe(beat())
    monitor.observe(status("dead", "connection lost"))
    clock.now += 1.0
    monitor.observe(beat())  # the broker is back and so is the replica
    clock.now += WILL_GRACE_S * 4
    monitor.observe(beat())
    assert monitor.check() == []


def test_failed_status_is_reported():
    monitor = LivenessMonitor(heartbeat_timeout_s=3, clock=FakeClock())
    monitor.observe(status("failed", "ModelError: no weights at /models/wan"))
    [trouble] = monitor.check()
    assert trouble.problem == "failed"
    assert "no weights" in trouble.detail


def test_stopped_replica_is_forgotten():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=1, clock=clock)
    monitor.observe(beat())
    monitor.observe(status("stopped"))
    clock.now += 10
    assert monitor.check() == []


def test_busy_replica_whose_progress_does_not_move_is_stalled():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=2, stall_timeout_s=5, clock=clock)
    for step in range(3):  # progressing
        monitor.observe(beat(request_id="r1", step=step))
        clock.now += 1
    assert monitor.check() == []
    for _ in range(6):  # heartbeats keep coming, the step does not move
        monitor.observe(beat(request_id="r1", step=2))
        clock.now += 1
    [trouble] = monitor.check()
    assert trouble.problem == "stalled"
    assert "request r1 stage 'denoise' stuck at step 2" in trouble.detail


def test_idle_replica_is_never_stalled():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=2, stall_timeout_s=1, clock=clock)
    for _ in range(10):
        monitor.observe(beat(done=4))
        clock.now += 1
    assert monitor.check() == []


def test_troubles_are_listed_in_replica_order():
    clock = FakeClock()
    monitor = LivenessMonitor(heartbeat_timeout_s=1, clock=clock)
    for node, replica in [("transformer", 1), ("decoder", 0), ("transformer", 0)]:
        monitor.expect(node, replica)
    clock.now += 2
    assert [(t.node, t.replica) for t in monitor.check()] == [("decoder", 0), ("transformer", 0), ("transformer", 1)]


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        LivenessMonitor(heartbeat_timeout_s=0)


def test_publisher_sends_numbered_heartbeats_with_current_progress():

    async def scenario():
        broker = MemoryBroker()
        progress = Progress()
        async with broker.connect("controller") as controller, broker.connect("worker") as worker:
            await controller.subscribe("hb/#")
            task = asyncio.create_task(publish_heartbeats(worker, "hb/w/0", "w", 0, progress, period_s=0.01))
            first = await controller.receive(1)
            progress.stage_started("r1", "denoise", 8)
            progress.step_done(5)
            beats = [await controller.receive(1) for _ in range(3)]
            task.cancel()
        assert first is not None and first.message.seq == 0 and first.message.request_id is None
        last = beats[-1]
        assert last is not None and last.message.seq == 3
        assert (last.message.request_id, last.message.stage, last.message.step, last.message.total_steps) == (
            "r1", "denoise", 5, 8,
        )

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_heartbeats_count_rejected_messages_and_end_when_the_broker_is_lost():

    class LosingBus:
        def __init__(self) -> None:
            self.sent: list[Message] = []
            self.rejected = Counter({"bad signature": 2, "replayed": 1})

        async def publish(self, topic: str, message: Message, *, retain: bool = False) -> None:
            if len(self.sent) == 2:
                raise BrokerLost("broker lost: no connection to broker 127.0.0.1:1 for 5.0 s")
            self.sent.append(message)

    async def scenario():
        bus = LosingBus()
        with pytest.raises(BrokerLost, match="broker lost"):
            await publish_heartbeats(bus, "hb/w/0", "w", 0, Progress(), period_s=0.01)  # type: ignore[arg-type]
        return bus.sent

    sent = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert [(m.seq, m.rejected) for m in sent] == [(0, 3), (1, 3)]
