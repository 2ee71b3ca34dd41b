"""Heartbeats: a worker publishes its progress periodically; the controller judges who is dead or stuck.

The worker's compute thread updates a :class:`Progress` (thread-safe); ``publish_heartbeats`` runs on the
worker's event loop and sends a snapshot every period. The controller feeds every ``Heartbeat`` and ``Status``
it receives into a :class:`LivenessMonitor` and asks it, whenever it likes, which replicas are in trouble:

- ``dead``: the replica's last will (state ``dead``) arrived and no heartbeat followed it for ``WILL_GRACE_S``: the
  process or its connection is gone (a broker that shuts down publishes every client's will; the replicas that
  live on send heartbeats again once it is back, which clears the will);
- ``failed``: the replica announced ``failed`` (e.g. its weights did not load);
- ``silent``: no heartbeat for longer than the heartbeat timeout (the whole process is stopped or hung);
- ``stalled``: heartbeats arrive but, while working on a request, its progress has not moved for longer than
  the stall timeout (the compute thread is stuck while the event loop still runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from engine.control.bus import ControlBus
from engine.control.messages import Heartbeat, Status

log = logging.getLogger(__name__)

Problem: TypeAlias = Literal["dead", "failed", "silent", "stalled"]
WILL_GRACE_S = 2.5  #: a last will is believed when no heartbeat follows it for this long (the broker is heard)
#: After the broker comes back, the replicas get this much longer: each reconnects on its own backoff (up to 2 s)
RECONNECT_ALLOWANCE_S = 2.0
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProgressSnapshot:
    request_id: str | None
    stage: str | None
    step: int
    total_steps: int
    requests_done: int


class Progress:
    """What a replica is doing, written by its compute thread and read by the heartbeat task; also how long it has
    been busy in all and how many segments wait for it (what the controller's autoscaling looks at)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._state = ProgressSnapshot(request_id=None, stage=None, step=0, total_steps=0, requests_done=0)
        self._clock = clock
        self._busy_s = 0.0  #: busy seconds of the requests finished
        self._busy_since: float | None = None  #: when work on the current request began
        self.waiting = 0  #: segments dispatched to this replica and not started yet

    def stage_started(self, request_id: str, stage: str, total_steps: int) -> None:
        with self._lock:
            if self._busy_since is None:
                self._busy_since = self._clock()
            self._state = ProgressSnapshot(request_id, stage, 0, total_steps, self._state.requests_done)

    def step_done(self, step: int) -> None:
        """``step`` steps of the current stage are done."""
        with self._lock:
            s = self._state
            self._state = ProgressSnapshot(s.request_id, s.stage, step, s.total_steps, s.requests_done)

    def request_finished(self) -> None:
        """The replica's work for the current request ended (done or failed); it is idle now."""
        with self._lock:
            if self._busy_since is not None:
                self._busy_s += self._clock() - self._busy_since
                self._busy_since = None
            self._state = ProgressSnapshot(None, None, 0, 0, self._state.requests_done + 1)

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return self._state

    def busy_seconds(self) -> float:
        """Seconds spent on requests since the start, the current one's so far included."""
        with self._lock:
            return self._busy_s + (self._clock() - self._busy_since if self._busy_since is not None else 0.0)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


def heartbeat(node: str, replica: int, seq: int, progress: ProgressSnapshot, rejected: int = 0, busy_s: float = 0.0,
              waiting: int = 0) -> Heartbeat:
    return Heartbeat(
        node=node,
        replica=replica,
        seq=seq,
        request_id=progress.request_id,
        stage=progress.stage,
        step=progress.step,
        total_steps=progress.total_steps,
        requests_done=progress.requests_done,
        rss_bytes=rss_bytes(),
        rejected=rejected,
        time=time.time(),
        busy_s=busy_s,
        waiting=waiting,
    )


async def publish_heartbeats(
    client: ControlBus, topic: str, node: str, replica: int, progress: Progress, period_s: float = 1.0
) -> None:
    """Publish a heartbeat every ``period_s`` until cancelled. While the broker is away the heartbeat waits in
    the bus's outbox (the controller, not this loop, decides when silence means trouble); a bus that gave up
    on the broker ends this loop with its BrokerLost."""
    seq = 0
    while True:
        await client.publish(topic, heartbeat(node, replica, seq, progress.snapshot(), sum(client.rejected.values()),
                                              progress.busy_seconds(), progress.waiting))
        seq += 1
        await asyncio.sleep(period_s)


@dataclass(frozen=True)
class Trouble:
    """A replica the controller should act on."""

    node: str
    replica: int
    problem: Problem
    detail: str

    def __str__(self) -> str:
        return f"node {self.node!r} replica {self.replica}: {self.detail}"


@dataclass
class _Seen:
    last_heartbeat: float  # monitor clock; the time tracking started until the first heartbeat arrives
    progress_key: tuple[str | None, str | None, int, int] | None
    progress_since: float
    status: Status | None
    will_at: float = 0.0  # monitor clock: when its last will arrived (or the clocks restarted since)


class LivenessMonitor:
    """Tracks replicas from their heartbeats and status messages; ``check()`` lists those in trouble."""

    def __init__(
        self,
        *,
        heartbeat_timeout_s: float,
        stall_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if heartbeat_timeout_s <= 0 or (stall_timeout_s is not None and stall_timeout_s <= 0):
            raise ValueError("liveness timeouts must be > 0")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._replicas: dict[tuple[str, int], _Seen] = {}

    def expect(self, node: str, replica: int) -> None:
        """Start tracking a replica now, so one that never sends a heartbeat is reported as silent."""
        now = self._clock()
        self._replicas.setdefault((node, replica), _Seen(now, None, now, None))

    def restart_clocks(self) -> None:
        """Count silence and stalls from now: the controller itself was cut off from the broker, so the
        heartbeats it missed say nothing about the replicas."""
        now = self._clock()
        for seen in self._replicas.values():
            seen.last_heartbeat = seen.progress_since = now
            seen.will_at = now + RECONNECT_ALLOWANCE_S

    def forget(self, node: str, replica: int) -> None:
        """Stop tracking a replica (it was stopped on purpose)."""
        self._replicas.pop((node, replica), None)

    def observe(self, message: Heartbeat | Status) -> None:
        now = self._clock()
        self.expect(message.node, message.replica)
        seen = self._replicas[(message.node, message.replica)]
        if isinstance(message, Status):
            if message.state == "stopped":
                self.forget(message.node, message.replica)
            else:
                seen.status = message
                seen.will_at = now
            return
        if seen.status is not None and seen.status.state == "dead":
            seen.status = None  # alive after all: its will was published by a broker going down
        seen.last_heartbeat = now
        key = (message.request_id, message.stage, message.step, message.requests_done)
        if key != seen.progress_key:
            seen.progress_key = key
            seen.progress_since = now

    def check(self) -> list[Trouble]:
        """Every tracked replica in trouble right now, in (node, replica) order."""
        now = self._clock()
        found = []
        for (node, replica), seen in sorted(self._replicas.items()):
            trouble = self._judge(seen, now)
            if trouble is not None:
                found.append(Trouble(node, replica, *trouble))
        return found

    def _judge(self, seen: _Seen, now: float) -> tuple[Problem, str] | None:
        if seen.status is not None and seen.status.state == "failed" or (
                seen.status is not None and seen.status.state == "dead" and now - seen.will_at > WILL_GRACE_S):
            state = seen.status.state
            return state, f"{state}: {seen.status.detail or 'no detail given'}"
        silent_s = now - seen.last_heartbeat
        if silent_s > self.heartbeat_timeout_s:
            what = "no heartbeat at all" if seen.progress_key is None else "no heartbeat"
            return "silent", f"{what} for {silent_s:.1f} s (heartbeat timeout {self.heartbeat_timeout_s:g} s)"
        key = seen.progress_key
        if self.stall_timeout_s is not None and key is not None and key[0] is not None:
            stalled_s = now - seen.progress_since
            if stalled_s > self.stall_timeout_s:
                return "stalled", (
                    f"request {key[0]} stage {key[1]!r} stuck at step {key[2]} for {stalled_s:.1f} s "
                    f"(stall timeout {self.stall_timeout_s:g} s)"
                )
        return None
