"""When to add or remove a replica of an elastic node: a pure policy over a window of observations.

Each replica's heartbeats carry how long it has been busy in all (``busy_s``: from its first stage of a request to
the end of its work on it, sending and writing included) and how many dispatched segments wait in its queue. A
:class:`LoadWindow` keeps those samples for the last ``window_s`` seconds and says, per node, what share of the
time its serving replicas were busy and how many segments waited per replica. :func:`decide` turns that into a
:class:`Decision` (or none):

- out, when the busy share is above ``out_busy`` or more than ``out_waiting`` segments wait per replica, below
  ``max``; a busy share alone not for a CPU node whose host's cores its workers already keep busy (less than a core
  spare): another replica there would only split the same cores, each job slower (two one-thread decoders decode
  a job slower than one on two threads); a queue still scales it out, as running jobs side by side beats waiting;
- in, when over the longer ``in_window_s`` the node would still be under ``in_busy`` with one replica fewer and
  nothing waited, above ``min`` (quick to add, slow to remove: a lull between bursts keeps the replicas);
- nothing while a replica of the node warms up or drains, within ``cooldown_s`` of the node's last change, or before
  the window has seen its whole length of the node as it is now (observations from before a change say nothing of
  the new count).

``in_busy`` well below ``out_busy`` keeps a steady load at the boundary from flapping: after scaling out at a share
just above ``out_busy``, the node with one replica fewer would be there again, far above ``in_busy``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from engine.spec.schema import Scaling

Direction = Literal["out", "in"]


@dataclass(frozen=True)
class Sample:
    at: float  #: the controller's clock when the heartbeat arrived
    busy_s: float  #: the replica's busy seconds since it started
    waiting: int  #: segments waiting in its queue


@dataclass(frozen=True)
class NodeLoad:
    """A node over the window: its serving replicas' mean busy share and segments waiting per replica."""

    busy: float
    waiting: float
    span_s: float  #: seconds the window covers (since the node's last change at most)


@dataclass(frozen=True)
class NodeState:
    """What the policy needs of a node besides its load."""

    replicas: int  #: serving: ready and not draining
    warming: int  #: started, not ready yet
    draining: int  #: taken out of dispatch, finishing their work
    fewest: int
    most: int
    changed_at: float  #: the clock when its replica count last changed (or the deployment was ready)
    #: cores of its host its workers leave idle (threads times busy share, summed), for a CPU node; None: not counted
    spare_cores: float | None = None


@dataclass(frozen=True)
class Decision:
    node: str
    direction: Direction
    reason: Literal["busy", "queue", "idle"]
    detail: str

    def __str__(self) -> str:
        return f"scale {self.direction} {self.node!r}: {self.detail}"


class LoadWindow:
    """Heartbeat samples of every replica over the last ``window_s`` seconds (the longest window looked at)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._samples: dict[tuple[str, int], deque[Sample]] = {}

    def observe(self, node: str, replica: int, sample: Sample) -> None:
        samples = self._samples.setdefault((node, replica), deque())
        if samples and sample.busy_s < samples[-1].busy_s:  # a new process of that replica counts from 0
            samples.clear()
        samples.append(sample)
        while samples and samples[0].at < sample.at - self.window_s:
            samples.popleft()

    def forget(self, node: str, replica: int) -> None:
        self._samples.pop((node, replica), None)

    def busy_share(self, node: str, replica: int, since: float) -> float | None:
        """The replica's busy share between ``since`` and its last sample; None with fewer than two samples."""
        samples = [s for s in self._samples.get((node, replica), ()) if s.at >= since]
        if len(samples) < 2 or samples[-1].at <= samples[0].at:
            return None
        return min(1.0, (samples[-1].busy_s - samples[0].busy_s) / (samples[-1].at - samples[0].at))

    def load(self, node: str, replicas: list[int], since: float, now: float, window_s: float) -> NodeLoad | None:
        """The node's load from ``since`` (at most ``window_s`` back, at most the window kept) over ``replicas``;
        None before any of them has two samples."""
        since = max(since, now - min(window_s, self.window_s))
        shares = [share for r in replicas if (share := self.busy_share(node, r, since)) is not None]
        if not shares:
            return None
        waiting = [s.waiting for r in replicas for s in self._samples.get((node, r), ()) if s.at >= since]
        return NodeLoad(busy=sum(shares) / len(shares), waiting=sum(waiting) / len(waiting) if waiting else 0.0,
                        span_s=now - since)


def decide(node: str, state: NodeState, recent: NodeLoad | None, longer: NodeLoad | None, policy: Scaling,
           now: float) -> Decision | None:
    """Scale ``node`` out (on its ``recent`` load, over ``window_s``), in (on its ``longer`` load, over
    ``in_window_s``), or leave it (see the module's docstring)."""
    if state.warming or state.draining or not state.replicas or now - state.changed_at < policy.cooldown_s:
        return None
    n = state.replicas
    if n < state.most and recent is not None and recent.span_s >= policy.window_s * 0.999:
        if recent.busy > policy.out_busy and (state.spare_cores is None or state.spare_cores >= 1):
            return Decision(node, "out", "busy", f"busy {recent.busy:.0%} of the last {recent.span_s:g} s over {n} "
                                                 f"replica(s), above {policy.out_busy:.0%}")
        if recent.waiting > policy.out_waiting:
            return Decision(node, "out", "queue", f"{recent.waiting:.1f} segment(s) waiting per replica over the last "
                                                  f"{recent.span_s:g} s, above {policy.out_waiting:g}")
    if n > state.fewest and longer is not None and longer.span_s >= policy.in_window_s * 0.999 and longer.waiting == 0:
        fewer = longer.busy * n / (n - 1)
        if fewer < policy.in_busy:
            return Decision(node, "in", "idle", f"busy {longer.busy:.0%} of the last {longer.span_s:g} s over {n} "
                                                f"replicas: {fewer:.0%} on {n - 1}, below {policy.in_busy:.0%}")
    return None
