"""The scheduler: walks each submitted request through the plan's segments, never letting one hang.

``submit()`` queues a request and returns a :class:`RequestHandle`. Up to the graph's in-flight bound (edge
slots times receiving replicas), requests are dispatched segment by segment (a segment is a run of stages on
one node) to the least loaded live replica, each told which replica its outputs go to. A dispatch is repeated
every ``resend_s`` until answered (the worker answers a repeat with the answer it gave), so a broker restart
loses no request. An answer counts only if it answers the dispatch the request waits on now: that replica,
that attempt, with outputs inside the run's folder; anything else is refused and counted. A replica taken out
of service re-runs its requests from the start on other replicas when every node still has one (at most
``MAX_ATTEMPTS`` times; a replica being restarted counts, and requests wait until it is ready), else fails them
naming the node, replica and stage; a segment past its deadline fails
its request, as does a request past its own deadline (``submit(deadline_s=)``). A cancelled request never runs
if queued; if running, its replicas are told to drop it (they stop at the next denoising step and free its
receive slots). A request that ends early is dropped on its replicas the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.control.bus import ControlBus
from engine.control.messages import Cancel, Heartbeat, Preview, RunStage, StageDone, StageFailed
from engine.control.topics import Topics
from engine.errors import NodeError
from engine.plan.model import Plan, Segment
from engine.preview.files import write_preview
from engine.controller.fleet import Fleet, ReplicaInfo
from engine.controller.progress import ProgressView
from engine.controller.tracker import State, TrackedRequest
from engine.stages import RequestParams

MAX_ATTEMPTS = 2
RESEND_S = 2.0  #: a dispatch not answered for this long is sent again


@dataclass
class NodeTime:
    """What a node's replicas spent on the segments they finished: working, and waiting in their queues first."""

    segments: int = 0
    busy_s: float = 0.0
    waited_s: float = 0.0


@dataclass
class CacheUse:
    """Cacheable stages (or their parts) run (misses) or skipped (hits), and the seconds the hits saved."""

    hits: int = 0
    misses: int = 0
    saved_s: float = 0.0
    #: per stage, or stage/part for a stage cached part by part: (hits, misses)
    by_part: dict[str, tuple[int, int]] = field(default_factory=dict)


class RequestHandle:
    """A submitted request: its live record, and a wait for its end."""

    def __init__(self, request: TrackedRequest):
        self.request = request
        self._ended = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.request.finished

    async def wait(self) -> TrackedRequest:
        """The request once done or failed."""
        await self._ended.wait()
        return self.request


class Scheduler:
    def __init__(self, plan: Plan, topics: Topics, bus: ControlBus, fleet: Fleet, view: ProgressView, out_dir: Path, *,
                 resend_s: float = RESEND_S, clock: Callable[[], float] = time.monotonic, preview_dir: Path | None = None):
        self.plan = plan
        self.topics = topics
        self.bus = bus
        self.fleet = fleet
        self.view = view
        self.out_dir = out_dir
        self.ended = asyncio.Event()  #: set when a request ends (whoever follows the requests clears it)
        self.resend_s = resend_s
        self.clock = clock
        self.requests: list[TrackedRequest] = []
        self.admitting = True  #: False: queued requests stay queued (a service draining before it stops)
        self.impostors = 0  #: authentic answers refused: not what was asked, or outputs outside the run
        self._handles: dict[str, RequestHandle] = {}
        self.node_time: dict[str, NodeTime] = {node: NodeTime() for node in plan.nodes}
        self.cache = CacheUse()
        self.preview_dir = preview_dir  #: where previews are written as files (engine run --preview); None: kept only

    @property
    def in_flight_cap(self) -> int:
        """Requests running at once: each edge's slots times the replicas serving its target now (an elastic
        node's count moves)."""
        return max(1, min((e.slots * max(1, self.fleet.counts(e.target)[0]) for e in self.plan.edges), default=1 << 30))

    def submit(self, params: RequestParams, request_id: str | None = None, deadline_s: float | None = None) -> RequestHandle:
        """Queue a request (id ``r<n>`` unless given), to end within ``deadline_s`` if given; it is dispatched on
        a later ``tick``."""
        request = TrackedRequest(request_id or f"r{len(self.requests) + 1}", params, self.clock())
        if request.id in self._handles:
            raise ValueError(f"request id {request.id!r} is already in use")
        if deadline_s is not None:
            request.expires = request.clock_zero + deadline_s
        self.requests.append(request)
        self._handles[request.id] = handle = RequestHandle(request)
        return handle

    def cancel(self, request_id: str, reason: str) -> TrackedRequest | None:
        """Cancel a request that has not ended: a queued one never runs, a running one is dropped on its
        replicas. None if there is no such request or it has ended already."""
        handle = self._handles.get(request_id)
        if handle is None or handle.finished:
            return None
        request = handle.request
        self._drop_on_replicas(request, reason)
        self._release(request)
        request.move(State.CANCELLED, reason)
        self._ended(request)
        return request

    def forget(self, request_id: str) -> None:
        """Drop an ended request from memory (a long-running service keeps its own records)."""
        handle = self._handles.get(request_id)
        if handle is not None and handle.finished:
            del self._handles[request_id]
            self.requests.remove(handle.request)

    def on_heartbeat(self, beat: Heartbeat) -> None:
        """Note the denoising step a replica reports for the request it runs (the request's progress)."""
        handle = self._handles.get(beat.request_id or "")
        if handle is not None and handle.request.state == State.RUNNING and beat.stage and beat.total_steps:
            handle.request.steps[(beat.node, beat.stage)] = (beat.step, beat.total_steps)

    def on_preview(self, preview: Preview) -> None:
        """Keep a preview as its request's latest (and write it under ``preview_dir``) if it comes from the replica
        running the request's current segment, for the current attempt; else drop it: a late one of an abandoned
        attempt, or one from a replica the segment was not dispatched to (refused and counted)."""
        handle = self._handles.get(preview.request_id)
        request = handle.request if handle is not None else None
        if request is None or request.state != State.RUNNING or request.attempt != preview.attempt:
            return
        segment = self.plan.segments[request.segment]
        if (segment.node, request.replica_of.get(segment.index)) != (preview.node, preview.replica) \
                or preview.stage not in segment.stages:
            self.refuse(self.topics.replica_client(preview.node, preview.replica),
                        f"a preview of {preview.request_id}'s {preview.stage!r}, which it does not run")
            return
        request.preview = preview
        if self.preview_dir is not None:
            request.previews_written.append(str(write_preview(self.preview_dir, preview)))

    @property
    def queued(self) -> int:
        return sum(r.state == State.QUEUED for r in self.requests)

    @property
    def running(self) -> int:
        return sum(r.state == State.RUNNING for r in self.requests)

    def tick(self) -> None:
        """Take out-of-service replicas into account, admit queued requests, enforce deadlines, repeat dispatches."""
        for info in self.fleet.take_down():
            self._replica_down(info)
        self._admit()
        now = self.clock()
        for request in self.requests:
            if not request.finished and now > request.expires:
                self._fail(request, f"not finished within its deadline of {request.expires - request.clock_zero:g} s")
            if request.state != State.RUNNING:
                continue
            if now > request.deadline:
                segment = self.plan.segments[request.segment]
                self._fail(request, f"node {segment.node!r} did not finish {', '.join(segment.stages)} within "
                                    f"{request.deadline - request.dispatched_at:g} s (timeouts.stage_s)")
            elif now - request.sent_at > self.resend_s:
                self._send_dispatch(request)

    def refuse(self, sender: str, what: str) -> None:
        """An authentic message not acted on: counted, shown once per sender."""
        self.impostors += 1
        self.view.refused(sender, what)

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        if not self.admitting or self._waiting_for_restarts():
            return
        running, cap = self.running, self.in_flight_cap
        for request in self.requests:
            if running >= cap:
                return
            if request.state == State.QUEUED:
                self._dispatch(request, 0)
                running += 1

    def _waiting_for_restarts(self) -> bool:
        """Whether a node serves with no replica now but has one being started again: requests wait for it (a
        node with none left at all fails them at dispatch)."""
        return any(self.fleet.has_live(node) and not self.fleet.serving(node) for node in self.plan.nodes)

    def _assign(self, request: TrackedRequest, index: int, node: str) -> int:
        """The replica segment ``index`` of the request runs on, chosen now if it has none yet."""
        if index not in request.replica_of:
            request.replica_of[index] = self.fleet.pick(node)
            self.fleet.replicas[(node, request.replica_of[index])].assigned += 1
        return request.replica_of[index]

    def _dispatch(self, request: TrackedRequest, index: int) -> None:
        segment = self.plan.segments[index]
        try:
            replica = self._assign(request, index, segment.node)
            send_to = {edge.name: self._assign(request, self._consumer(edge.target, edge.tensor_names, index), edge.target)
                       for edge in self.plan.edges_from(segment.node) if set(edge.tensor_names) & set(segment.outputs)}
        except NodeError as exc:
            self._retry_or_fail(request, str(exc))
            return
        stage_budget = self.plan.timeouts.stage_s * len(segment.stages) + self.plan.timeouts.transfer_s * 2
        request.dispatch = RunStage(request_id=request.id, request=request.params.model_dump(mode="json"),
                                    node=segment.node, attempt=request.attempt, deadline_s=stage_budget, segment=index,
                                    send_to=send_to)
        request.segment = index
        request.dispatched_at = self.clock()
        request.deadline = request.dispatched_at + stage_budget
        request.move(State.RUNNING, f"{segment.node}[{replica}] {', '.join(segment.stages)}")
        self.view.segment_started(request, segment, replica)
        self._send_dispatch(request)

    def _send_dispatch(self, request: TrackedRequest) -> None:
        """Post the request's current dispatch to its replica; the bus's outbox owns the sending."""
        assert request.dispatch is not None
        request.sent_at = self.clock()
        self.bus.post(self.topics.inbox(request.dispatch.node, request.replica_of[request.segment]), request.dispatch)

    def _consumer(self, node: str, tensors: tuple[str, ...], after: int) -> int:
        return next(s.index for s in self.plan.segments if s.index > after and s.node == node and set(s.inputs) & set(tensors))

    # -- answers ----------------------------------------------------------------------------------------------

    def on_answer(self, answer: StageDone | StageFailed) -> None:
        found = self._current(answer)
        if found is None:
            return
        if isinstance(answer, StageDone):
            self._on_done(answer, *found)
        else:
            self._on_failed(answer, found[0])

    def _current(self, answer: StageDone | StageFailed) -> tuple[TrackedRequest, Segment] | None:
        """The request and segment an answer is for, if it answers the dispatch the request waits on now."""
        handle = self._handles.get(answer.request_id)
        request = handle.request if handle is not None else None
        if request is None or request.attempt != answer.attempt or request.state != State.RUNNING:
            return None  # a late answer for an attempt that was abandoned, or a repeated one
        segment = self.plan.segments[request.segment]
        sender = self.topics.replica_client(answer.node, answer.replica)
        if segment.node != answer.node or request.replica_of.get(segment.index) != answer.replica:
            if any(self.plan.segments[index].node == answer.node and replica == answer.replica
                   for index, replica in request.replica_of.items() if index < segment.index):
                return None  # a repeat of an answer taken already (the replica answered a resent dispatch again)
            self.refuse(sender, f"{answer.kind!r} for {answer.request_id}, whose segment {segment.index} was not "
                                "dispatched to it")
            return None
        outside = [path for path in getattr(answer, "outputs", ()) if Path(path).resolve().parent != self.out_dir.resolve()]
        if outside:
            self.refuse(sender, f"{answer.kind!r} for {answer.request_id} naming outputs outside {self.out_dir}: {outside}")
            return None
        return request, segment

    def _on_done(self, done: StageDone, request: TrackedRequest, segment: Segment) -> None:
        info = self.fleet.replicas[(done.node, done.replica)]
        info.assigned -= 1
        info.peak_rss_bytes = max(info.peak_rss_bytes, done.peak_rss_bytes)
        spent = self.node_time[done.node]
        spent.segments, spent.busy_s, spent.waited_s = spent.segments + 1, spent.busy_s + done.busy_s, spent.waited_s + done.waited_s
        request.cached.update(done.cached)
        request.saved_s += done.saved_s
        self.cache.hits += sum(done.cached.values())
        self.cache.misses += sum(not hit for hit in done.cached.values())
        self.cache.saved_s += done.saved_s
        for part, hit in done.cached.items():
            hits, misses = self.cache.by_part.get(part, (0, 0))
            self.cache.by_part[part] = (hits + hit, misses + (not hit))
        request.stage_seconds.update(done.timings)
        request.step_cache.update(done.step_cache)
        request.segment_seconds[segment.index] = self.clock() - request.dispatched_at
        request.edges.update({name: stats.model_dump() for name, stats in done.edges.items()})
        request.outputs.extend(done.outputs)
        request.backends.update({stage: {"node": done.node, **use.model_dump()} for stage, use in done.backends.items()})
        self.view.segment_done(request, segment, done)
        if segment.index + 1 < len(self.plan.segments):
            self._dispatch(request, segment.index + 1)
        else:
            request.move(State.DONE, f"outputs: {', '.join(request.outputs) or 'none'}")
            self._ended(request)

    def _on_failed(self, failed: StageFailed, request: TrackedRequest) -> None:
        where = f"node {failed.node!r} replica {failed.replica}" + (f" stage {failed.stage!r}" if failed.stage else "")
        detail = f"{where} failed: {failed.error_type}: {failed.error}"
        if failed.log_tail:
            detail += "\n  last log lines:\n    " + failed.log_tail.replace("\n", "\n    ")
        self._fail(request, detail)

    # -- trouble ----------------------------------------------------------------------------------------------

    def _replica_down(self, info: ReplicaInfo) -> None:
        for request in self.requests:
            if request.finished or info.key not in {
                    (self.plan.segments[i].node, r) for i, r in request.replica_of.items() if i >= request.segment}:
                continue
            self._retry_or_fail(request, self.fleet.report(info, self._running_stage(request, info)))

    def _retry_or_fail(self, request: TrackedRequest, message: str) -> None:
        """Run the request again from the start when attempts remain and every node still has a replica (or one
        being started again), else fail it with ``message``."""
        if request.attempt + 1 < MAX_ATTEMPTS and all(self.fleet.has_live(node) for node in self.plan.nodes):
            self._release(request)
            request.attempt += 1
            request.replica_of.clear()
            request.steps.clear()
            request.move(State.QUEUED, f"retrying from the start: {message}")
            self.view.retry(request, message)
        else:
            self._fail(request, message)

    def _running_stage(self, request: TrackedRequest, info: ReplicaInfo) -> str | None:
        segment = self.plan.segments[request.segment] if request.segment >= 0 else None
        if segment is None or segment.node != info.node:
            return None
        return self.view.current_stage(info.node, info.replica) or ", ".join(segment.stages)

    def _release(self, request: TrackedRequest) -> None:
        for index, replica in request.replica_of.items():
            info = self.fleet.replicas.get((self.plan.segments[index].node, replica))
            if index >= request.segment and info is not None:  # None: drained, died and already handed back
                info.assigned = max(0, info.assigned - 1)

    def _drop_on_replicas(self, request: TrackedRequest, reason: str) -> None:
        """Tell the replicas of a running request's remaining segments to drop it."""
        if request.state != State.RUNNING:
            return
        cancel = Cancel(request_id=request.id, reason=reason)
        for node, replica in sorted({(self.plan.segments[i].node, r) for i, r in request.replica_of.items()
                                     if i >= request.segment}):
            self.bus.post(self.topics.inbox(node, replica), cancel)

    def _fail(self, request: TrackedRequest, error: str) -> None:
        if request.finished:
            return
        self._drop_on_replicas(request, error.splitlines()[0])
        self._release(request)
        request.error = error
        request.move(State.FAILED, error.splitlines()[0])
        self._ended(request)

    def _ended(self, request: TrackedRequest) -> None:
        self.view.request_finished(request)
        self._handles[request.id]._ended.set()  # noqa: SLF001
        self.ended.set()
