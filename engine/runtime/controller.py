"""The controller: deploy the plan's workers, walk each request through the graph, never hang.

It starts (or connects to) the broker, starts one worker process per node replica, waits until every one
has loaded and announced itself, then dispatches each request segment by segment (a segment is a run of
stages on one node) to the least loaded replica, telling each the replica its outputs go to. Worker
deaths (process exit or last will), silent workers (missing heartbeats) and missed deadlines end the
affected requests with an error that names the node, replica and stage, or re-run them from the start on
another replica when the node has one. Every worker is stopped on success, error and Ctrl-C.

Trust: a message counts only if the replica that signed it is the one it speaks for, and a result only if it
answers the segment dispatch the request is waiting on (that replica, that attempt), with outputs inside the
run's folder. The broker: a dispatch is repeated every ``RESEND_S`` until answered (the worker answers a
repeat with the answer it gave), so a broker restart loses no request; while the controller is cut off from
the broker, silence is not held against the workers; a broker gone longer than ``timeouts.broker_s`` ends the
run with BrokerLost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.control.broker import BrokerAddress, EmbeddedBroker, embedded_broker, parse_broker
from engine.control.client import ControlClient
from engine.control.heartbeat import LivenessMonitor
from engine.control.messages import Heartbeat, RunStage, Shutdown, StageDone, StageFailed, Status
from engine.control.topics import Topics
from engine.errors import EngineError, NodeError, PlanError
from engine.plan.model import Plan, Segment
from engine.runtime.access import RunAccess
from engine.runtime.deployment import worker_specs
from engine.runtime.launcher import LocalLauncher, WorkerProcess, exit_description
from engine.runtime.progress import ProgressView
from engine.runtime.tracker import State, TrackedRequest
from engine.stages import RequestParams

TICK_S = 0.1
MAX_ATTEMPTS = 2
RESEND_S = 2.0  #: a dispatch not answered for this long is sent again


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    run_id: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    save_frames: bool = False
    quiet: bool = False
    heartbeat_s: float = 0.5
    broker_kind: str = "auto"  #: for ``broker: embedded``: auto, mosquitto or amqtt


@dataclass
class ReplicaInfo:
    node: str
    replica: int
    state: str = "starting"
    pid: int | None = None
    load_s: float | None = None
    param_bytes: int | None = None
    peak_rss_bytes: int = 0
    rss_bytes: int = 0
    down: str | None = None  #: why it is out of service
    assigned: int = 0  #: segments dispatched or promised to it and not finished
    rejected: int = 0  #: control messages it refused (from its heartbeats)


@dataclass
class RunResult:
    run_id: str
    out_dir: Path
    requests: list[TrackedRequest]
    replicas: dict[tuple[str, int], ReplicaInfo]
    started: float
    ready_s: float
    seconds: float
    refused: dict[str, int]  #: messages the controller refused, by reason
    broker_reconnects: int


@contextlib.asynccontextmanager
async def broker_for(target: BrokerAddress | EmbeddedBroker, kind: str, access: RunAccess) -> AsyncIterator[BrokerAddress]:
    if isinstance(target, EmbeddedBroker):
        chosen = kind if kind != "auto" else target.kind
        async with embedded_broker(chosen, users=list(access.users.values())) as address:  # type: ignore[arg-type]
            yield address
    else:
        yield target


class Controller:
    def __init__(self, plan: Plan, source: Path, options: RunOptions):
        remote = [n.name for n in plan.nodes.values() if n.host != "local"]
        if remote:
            raise PlanError(f"node(s) {', '.join(remote)} are placed on another host; this engine starts local workers "
                            "only: set place.host: local")
        self.plan = plan
        self.source = source
        self.options = options
        self.topics = Topics(options.run_id)
        self.view = ProgressView(quiet=options.quiet)
        self.replicas = {(n.name, r): ReplicaInfo(n.name, r) for n in plan.nodes.values() for r in range(n.replicas)}
        self.monitor = LivenessMonitor(heartbeat_timeout_s=plan.timeouts.heartbeat_s)
        self.requests: list[TrackedRequest] = []
        self.launcher: LocalLauncher | None = None
        self.client: ControlClient | None = None
        self.broker = parse_broker(plan.broker)
        self.access = RunAccess.for_run(self.topics, plan, embedded=isinstance(self.broker, EmbeddedBroker))
        self.impostors = 0  #: authentic messages whose signer is not who they speak for
        self.reconnects_seen = 0
        self.clock_zero = time.monotonic()
        self.in_flight_cap = max(1, min((e.slots * plan.nodes[e.target].replicas for e in plan.edges), default=1 << 30))

    # -- the run ----------------------------------------------------------------------------------------------

    async def run(self, requests: list[RequestParams]) -> RunResult:
        self.options.out_dir.mkdir(parents=True, exist_ok=True)
        async with broker_for(self.broker, self.options.broker_kind, self.access) as address:
            me = self.topics.controller_client
            self.client = ControlClient(self.access.address(address, me), client_id=me, key=self.access.key,
                                        broker_timeout_s=self.plan.timeouts.broker_s)
            await self.client.connect()
            self.launcher = LocalLauncher(self.options.out_dir / "deploy")
            try:
                for topic in (self.topics.all_status, self.topics.all_heartbeats, self.topics.controller):
                    await self.client.subscribe(topic)
                for spec in worker_specs(self.plan, run_id=self.options.run_id, source=self.source,
                                         broker=functools.partial(self.access.worker_broker, address),
                                         out_dir=self.options.out_dir, save_frames=self.options.save_frames,
                                         heartbeat_s=self.options.heartbeat_s):
                    self.launcher.start(spec, self.access.worker_secrets(address, spec.node, spec.replica))
                self.view.deploying(len(self.replicas))
                await self._wait_ready()
                ready_s = time.monotonic() - self.clock_zero
                self.view.ready(ready_s, self.replicas)
                self.requests = [TrackedRequest(f"r{i + 1}", params, time.monotonic()) for i, params in enumerate(requests)]
                await self._drive()
                return RunResult(self.options.run_id, self.options.out_dir, self.requests, self.replicas,
                                 self.clock_zero, ready_s, time.monotonic() - self.clock_zero,
                                 refused={**self.client.rejected, "impostor": self.impostors},
                                 broker_reconnects=self.client.reconnects)
            finally:
                await self._teardown()

    async def _teardown(self) -> None:
        assert self.client is not None and self.launcher is not None
        for (node, replica) in self.replicas:
            with contextlib.suppress(EngineError, asyncio.TimeoutError):
                await asyncio.wait_for(self.client.publish(self.topics.inbox(node, replica), Shutdown(reason="run finished")), 1)
                await self.client.clear_retained(self.topics.status(node, replica))
        await asyncio.to_thread(self.launcher.stop_all)
        await self.client.close()

    async def _messages(self) -> None:
        """Handle what arrived within one tick, then check processes, liveness and deadlines."""
        assert self.client is not None
        inbound = await self.client.receive(TICK_S)
        while inbound is not None:
            if inbound.sender == self.topics.signer_of(inbound.message):
                self._on_message(inbound.message)
            else:
                self._impostor(inbound.sender, f"{inbound.message.kind!r} speaking for another client")
            inbound = await self.client.receive(0)
        self._check_processes()

    def _impostor(self, sender: str, what: str) -> None:
        """An authentic message the controller will not act on: counted, logged once per sender."""
        self.impostors += 1
        self.view.refused(sender, what)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.plan.timeouts.ready_s
        while True:
            await self._messages()
            failed = [r for r in self.replicas.values() if r.down is not None]
            if failed:
                raise NodeError(self._replica_report(failed[0], named=False), node=failed[0].node, replica=failed[0].replica)
            if all(r.state == "ready" for r in self.replicas.values()):
                for r in self.replicas.values():
                    self.monitor.expect(r.node, r.replica)
                return
            if time.monotonic() > deadline:
                waiting = [f"{r.node}[{r.replica}] ({r.state})" for r in self.replicas.values() if r.state != "ready"]
                raise NodeError(f"not ready after {self.plan.timeouts.ready_s:g} s (timeouts.ready_s): {', '.join(waiting)}")

    async def _drive(self) -> None:
        while not all(r.finished for r in self.requests):
            self._admit()
            await self._messages()
            self._check_liveness()
            self._check_deadlines()
            self._resend()

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        running = sum(r.state == State.RUNNING for r in self.requests)
        for request in self.requests:
            if running >= self.in_flight_cap:
                return
            if request.state == State.QUEUED:
                self._dispatch(request, 0)
                running += 1

    def _pick(self, node: str) -> int:
        live = [r for r in self.replicas.values() if r.node == node and r.down is None]
        if not live:
            raise NodeError("no live replica left", node=node)
        return min(live, key=lambda r: (r.assigned, r.replica)).replica

    def _dispatch(self, request: TrackedRequest, index: int) -> None:
        segment = self.plan.segments[index]
        try:
            replica = request.replica_of.get(index)
            if replica is None:
                replica = request.replica_of[index] = self._pick(segment.node)
                self.replicas[(segment.node, replica)].assigned += 1
            send_to = {}
            for edge in self.plan.edges_from(segment.node):
                if not set(edge.tensor_names) & set(segment.outputs):
                    continue
                consumer = self._consumer(edge.target, edge.tensor_names, index)
                if consumer not in request.replica_of:
                    request.replica_of[consumer] = self._pick(edge.target)
                    self.replicas[(edge.target, request.replica_of[consumer])].assigned += 1
                send_to[edge.name] = request.replica_of[consumer]
        except NodeError as exc:
            self._fail(request, str(exc))
            return
        stage_budget = self.plan.timeouts.stage_s * len(segment.stages) + self.plan.timeouts.transfer_s * 2
        request.dispatch = RunStage(request_id=request.id, request=request.params.model_dump(mode="json"),
                                    node=segment.node, attempt=request.attempt, deadline_s=stage_budget, segment=index,
                                    send_to=send_to)
        request.segment = index
        request.dispatched_at = time.monotonic()
        request.deadline = request.dispatched_at + stage_budget
        request.move(State.RUNNING, f"{segment.node}[{replica}] {', '.join(segment.stages)}")
        self.view.segment_started(request, segment, replica)
        self._send_dispatch(request)

    def _send_dispatch(self, request: TrackedRequest) -> None:
        """Post the request's current dispatch to its replica; the client's outbox owns the sending."""
        assert self.client is not None and request.dispatch is not None
        request.sent_at = time.monotonic()
        replica = request.replica_of[request.segment]
        self.client.post(self.topics.inbox(request.dispatch.node, replica), request.dispatch)

    def _resend(self) -> None:
        """Dispatches unanswered for RESEND_S go out again (a restarted broker may have lost them or their answer)."""
        now = time.monotonic()
        for request in self.requests:
            if request.state == State.RUNNING and now - request.sent_at > RESEND_S:
                self._send_dispatch(request)

    def _consumer(self, node: str, tensors: tuple[str, ...], after: int) -> int:
        return next(s.index for s in self.plan.segments if s.index > after and s.node == node and set(s.inputs) & set(tensors))

    # -- what workers say -------------------------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Status):
            self._on_status(message)
        elif isinstance(message, Heartbeat):
            info = self.replicas.get((message.node, message.replica))
            if info is not None:
                info.rss_bytes = message.rss_bytes
                info.peak_rss_bytes = max(info.peak_rss_bytes, message.rss_bytes)
                info.rejected = message.rejected
                if info.state == "ready":  # silence counts from readiness: loading sends no heartbeats
                    self.monitor.observe(message)
                self.view.heartbeat(message)
        elif isinstance(message, StageDone):
            self._on_done(message)
        elif isinstance(message, StageFailed):
            self._on_failed(message)

    def _on_status(self, status: Status) -> None:
        info = self.replicas.get((status.node, status.replica))
        if info is None:
            return
        info.state, info.pid = status.state, status.pid
        if status.state == "ready":
            info.load_s, info.param_bytes = status.load_s, status.param_bytes
        if status.state in ("dead", "failed") and info.down is None:
            self._replica_down(info, f"{status.state}: {status.detail or 'no detail'}")

    def _current(self, answer: StageDone | StageFailed) -> tuple[TrackedRequest, Segment] | None:
        """The request and segment an answer is for, if it answers the dispatch the request waits on now."""
        request = next((r for r in self.requests if r.id == answer.request_id), None)
        if request is None or request.attempt != answer.attempt or request.state != State.RUNNING:
            return None  # a late answer for an attempt that was abandoned, or a repeated one
        segment = self.plan.segments[request.segment]
        if segment.node != answer.node or request.replica_of.get(segment.index) != answer.replica:
            self._impostor(self.topics.replica_client(answer.node, answer.replica),
                           f"{answer.kind!r} for {answer.request_id}, whose segment {segment.index} was not dispatched to it")
            return None
        return request, segment

    def _outside_run(self, outputs: list[str]) -> list[str]:
        root = self.options.out_dir.resolve()
        return [path for path in outputs if Path(path).resolve().parent != root]

    def _on_done(self, done: StageDone) -> None:
        found = self._current(done)
        if found is None:
            return
        request, segment = found
        outside = self._outside_run(done.outputs)
        if outside:
            self._impostor(self.topics.replica_client(done.node, done.replica),
                           f"'stage_done' for {done.request_id} naming outputs outside {self.options.out_dir}: {outside}")
            return
        info = self.replicas[(done.node, done.replica)]
        info.assigned -= 1
        info.peak_rss_bytes = max(info.peak_rss_bytes, done.peak_rss_bytes)
        request.stage_seconds.update(done.timings)
        request.segment_seconds[segment.index] = time.monotonic() - request.dispatched_at
        request.edges.update({name: stats.model_dump() for name, stats in done.edges.items()})
        request.outputs.extend(done.outputs)
        self.view.segment_done(request, segment, done)
        if segment.index + 1 < len(self.plan.segments):
            self._dispatch(request, segment.index + 1)
        else:
            request.move(State.DONE, f"outputs: {', '.join(request.outputs) or 'none'}")
            self.view.request_finished(request)

    def _on_failed(self, failed: StageFailed) -> None:
        found = self._current(failed)
        if found is None:
            return
        request, _ = found
        where = f"node {failed.node!r} replica {failed.replica}" + (f" stage {failed.stage!r}" if failed.stage else "")
        detail = f"{where} failed: {failed.error_type}: {failed.error}"
        if failed.log_tail:
            detail += "\n  last log lines:\n    " + failed.log_tail.replace("\n", "\n    ")
        self._fail(request, detail)

    # -- trouble ----------------------------------------------------------------------------------------------

    def _check_processes(self) -> None:
        assert self.launcher is not None
        for worker in self.launcher.exited():
            info = self.replicas[worker.key]
            if info.down is None:
                self._replica_down(info, f"process {exit_description(worker.exit_code() or 0)}")

    def _check_liveness(self) -> None:
        assert self.client is not None
        if not self.client.connected:
            return  # cut off from the broker ourselves: the workers' silence says nothing about them
        if self.client.reconnects != self.reconnects_seen:
            self.reconnects_seen = self.client.reconnects
            self.monitor.restart_clocks()
            self.view.broker_back(self.client.address.display)
        for trouble in self.monitor.check():
            info = self.replicas.get((trouble.node, trouble.replica))
            if info is not None and info.down is None:
                assert self.launcher is not None
                self.launcher.kill((trouble.node, trouble.replica))  # stuck: make sure it does no more harm
                self._replica_down(info, f"stopped responding ({trouble.detail}); killed")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for request in self.requests:
            if request.state == State.RUNNING and now > request.deadline:
                segment = self.plan.segments[request.segment]
                self._fail(request, f"node {segment.node!r} did not finish {', '.join(segment.stages)} within "
                                    f"{request.deadline - request.dispatched_at:g} s (timeouts.stage_s)")

    def _replica_down(self, info: ReplicaInfo, why: str) -> None:
        info.down = why
        self.monitor.forget(info.node, info.replica)
        self.view.replica_down(info, why)
        for request in self.requests:
            if request.finished or (info.node, info.replica) not in {
                    (self.plan.segments[i].node, r) for i, r in request.replica_of.items() if i >= request.segment}:
                continue
            stage = self._running_stage(request, info)
            message = self._replica_report(info, stage)
            if request.attempt + 1 < MAX_ATTEMPTS and all(
                    any(r.down is None for r in self.replicas.values() if r.node == node) for node in self.plan.nodes):
                self._release(request)
                request.attempt += 1
                request.replica_of.clear()
                request.move(State.QUEUED, f"retrying from the start: {message}")
                self.view.retry(request, message)
            else:
                self._fail(request, message)

    def _running_stage(self, request: TrackedRequest, info: ReplicaInfo) -> str | None:
        segment = self.plan.segments[request.segment] if request.segment >= 0 else None
        if segment is None or segment.node != info.node:
            return None
        return self.view.current_stage(info.node, info.replica) or ", ".join(segment.stages)

    def _replica_report(self, info: ReplicaInfo, stage: str | None = None, *, named: bool = True) -> str:
        """Why a replica is out, with its log tail; ``named`` puts the node, replica and stage in front."""
        where = f"node {info.node!r} replica {info.replica}" + (f" (stage {stage!r})" if stage else "") + ": "
        text = (where if named else "") + str(info.down)
        worker = self.launcher.workers.get((info.node, info.replica)) if self.launcher else None
        tail = worker.log_tail() if worker is not None else ""
        return text + (f"\n  last log lines ({worker.log_path}):\n    " + tail.replace("\n", "\n    ") if tail else "")

    def _release(self, request: TrackedRequest) -> None:
        for index, replica in request.replica_of.items():
            if index >= request.segment:
                info = self.replicas[(self.plan.segments[index].node, replica)]
                info.assigned = max(0, info.assigned - 1)

    def _fail(self, request: TrackedRequest, error: str) -> None:
        if request.finished:
            return
        self._release(request)
        request.error = error
        request.move(State.FAILED, error.splitlines()[0])
        self.view.request_finished(request)


async def run_graph(plan: Plan, source: Path, requests: list[RequestParams], options: RunOptions) -> RunResult:
    return await Controller(plan, source, options).run(requests)
