"""Requests as state machines: the allowed transitions as a table, every transition timestamped, and each
segment run (which replica, dispatched when, over when) recorded for the report's timeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.control.messages import Preview, RunStage
from engine.errors import EngineError
from engine.stages import RequestParams
from engine.stepcache.stats import StepCacheStats


class State(str, Enum):
    QUEUED = "queued"  #: waiting for a free slot in the pipeline (or re-queued for a retry)
    RUNNING = "running"  #: one of its segments is dispatched to a replica
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  #: dropped on a client's word before it ended


ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.FAILED, State.CANCELLED}),
    State.RUNNING: frozenset({State.RUNNING, State.DONE, State.FAILED, State.QUEUED, State.CANCELLED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}

#: How the running segment ended, by the transition that ends it.
RUN_OUTCOME: dict[State, str] = {
    State.RUNNING: "done",  # the next segment was dispatched
    State.DONE: "done",
    State.FAILED: "failed",
    State.QUEUED: "retried",  # abandoned: the request starts again on other replicas
    State.CANCELLED: "cancelled",
}


@dataclass
class Event:
    time: float  #: seconds since the run started
    state: State
    detail: str


@dataclass
class SegmentRun:
    """One dispatch of one segment to a replica; times in seconds on the request's clock (as events)."""

    segment: int
    replica: int | None
    attempt: int
    dispatched: float
    done: float | None = None  #: when the controller heard it finish, or gave up on it
    outcome: str | None = None  #: done, failed or retried; None while it runs


@dataclass
class TrackedRequest:
    id: str
    params: RequestParams
    clock_zero: float
    state: State = State.QUEUED
    attempt: int = 0
    segment: int = -1  #: segment running now (-1 before the first)
    dispatched_at: float = 0.0
    deadline: float = float("inf")  #: monotonic time by which the running segment must report
    expires: float = float("inf")  #: monotonic time by which the whole request must end (a service's job deadline)
    dispatch: RunStage | None = None  #: the running segment's dispatch, repeated until answered
    sent_at: float = 0.0  #: when the dispatch was last posted (monotonic)
    replica_of: dict[int, int] = field(default_factory=dict)  #: segment -> replica it runs (or will run) on
    events: list[Event] = field(default_factory=list)
    runs: list[SegmentRun] = field(default_factory=list)  #: every segment dispatch, in order
    stage_seconds: dict[str, float] = field(default_factory=dict)
    segment_seconds: dict[int, float] = field(default_factory=dict)  #: dispatch to done, per segment
    edges: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    #: stage -> how its backend chain ran (engine.backends), with the node that ran it
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    steps: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  #: (node, stage) -> (step, of total)
    step_cache: dict[str, StepCacheStats] = field(default_factory=dict)  #: stage -> DiT passes run and skipped
    cached: dict[str, bool] = field(default_factory=dict)  #: cacheable stage -> whether its outputs were a cache hit
    saved_s: float = 0.0  #: seconds its cache hits saved
    preview: Preview | None = None  #: the latest preview of its denoising (engine.preview)
    previews_written: list[str] = field(default_factory=list)  #: files ``engine run --preview DIR`` wrote

    def __post_init__(self) -> None:
        self.events.append(Event(self.now(), self.state, "submitted"))

    def now(self) -> float:
        return time.monotonic() - self.clock_zero

    def move(self, state: State, detail: str) -> None:
        if state not in ALLOWED[self.state]:
            raise EngineError(f"request {self.id}: no transition from {self.state.value} to {state.value} ({detail})")
        now = self.now()
        if self.runs and self.runs[-1].outcome is None:  # any transition ends the running segment
            self.runs[-1].done, self.runs[-1].outcome = now, RUN_OUTCOME[state]
        if state == State.RUNNING:  # a dispatch: the controller has set segment and replica_of
            self.runs.append(SegmentRun(self.segment, self.replica_of.get(self.segment), self.attempt, now))
        self.state = state
        self.events.append(Event(now, state, detail))

    @property
    def finished(self) -> bool:
        return self.state in (State.DONE, State.FAILED, State.CANCELLED)

    @property
    def progress(self) -> float:
        """How far the request is, 0 to 1, from its denoising steps: the steps its stages reported done over the
        steps it asked for (families without ``steps``: over those reported); 1 only once done."""
        if self.state == State.DONE:
            return 1.0
        done = sum(step for step, _ in self.steps.values())
        total = getattr(self.params, "steps", None) or sum(total for _, total in self.steps.values())
        return min(0.99, done / total) if total else 0.0

    @property
    def seconds(self) -> float:
        return self.events[-1].time - self.events[0].time
