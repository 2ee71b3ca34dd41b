"""A worker: one OS process running one replica of one node.

It loads only its stages' components, opens the receive pools of its inbound edges once, announces itself
(retained ``status`` ready, with where senders write), then serves: ``run_stage`` jobs run one at a time on a
compute thread; edge messages (grants, deliveries, acknowledgements, fences) are answered by the asyncio loop
meanwhile, so a replica busy denoising still receives the next request's inputs. Heartbeats carry progress.

It acts on a message only when the replica that signed it is the one the message says it comes from and
may send it: run_stage and shutdown only from the controller, edge messages only from the other end of
that edge. Questions may come more than once (the asker repeats them until answered, see
:mod:`engine.worker.edge_link` and the controller): a repeated run_stage, grant request or delivery is
answered with the answer already given, never run twice. Files are written only under the run's output
folder.

    python -m engine.worker.worker SPEC.json    (the secrets, WorkerSecrets as JSON, on standard input)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Hashable
from pathlib import Path
from typing import Any

from engine.backends.chain import stage_uses, with_backends
from engine.control.broker import BrokerAddress, TLSOptions
from engine.control.bus import Inbound
from engine.control.client import ControlClient, LastWill
from engine.control.heartbeat import RECONNECT_ALLOWANCE_S, WILL_GRACE_S, Progress, publish_heartbeats, rss_bytes
from engine.control.messages import (Ack, Cancel, CpuShare, Delivered, EdgeStats, Fence, Grant, GrantRequest, Landed,
                                     Preview, ReplicaRef, ReplicaRestarting, RunStage, Shutdown, StageDone, StageFailed,
                                     Status)
from engine.control.topics import Topics
from engine.display import human_bytes
from engine.errors import EngineError, TransportError
from engine.families import get_family
from engine.models.outputs import output_stem
from engine.plan.feeder import FEEDER
from engine.preview.sink import Picture, Sink, cadence, previews
from engine.worker.contract import EdgeEnd, SegmentSpec, WorkerSecrets, WorkerSpec
from engine.worker.edge_link import MqttEdgeLink
from engine.worker.heap import release_freed_memory
from engine.worker.inbound import InboundShapes
from engine.worker.input_files import read_input_files, remove_input_files, write_input_files
from engine.worker.output_cache import CachedStage, OutputCache, with_output_cache
from engine.worker.threads import ComputeThread, TorchThreads
from engine.control.replies import Replies
from engine.stages import ProgressFn, Stage
from engine.stepcache.stats import StepCacheStats, with_node_cache
from engine.stepcache.stats import collect as collect_step_caches
from engine.stream.remote import ChunkSender, chunk_expected, chunk_of
from engine.stream.video import VideoStream
from engine.plan.collector import COLLECTOR
from engine.worker.group import GroupBroken, RankGroup
from engine.transport import Manifest, Receiver, Sender, SlotGrant, SlotsExhausted, accept, make_receiver, make_sender, send_tensors

log = logging.getLogger("engine.worker")

ANSWERS_KEPT = 64  #: answers kept per kind whatever their age, to answer a repeated question the same way
ANSWER_KEPT_S = 60.0  #: and beyond those, how long an answer is kept after it was given (the controller asks again every 2 s)
FAREWELL_S = 2.0  #: how long a stopping worker tries to announce it (the broker may be gone)
RANK_CHECK_S = 0.5  #: how often rank 0 looks whether its follower ranks still run


class Cancelled(EngineError):
    """The controller dropped the request this replica works on (cancelled, or past its deadline)."""


class LogTail(logging.Handler):
    """The last lines this worker logged, sent along with a failure."""

    def __init__(self, lines: int = 20):
        super().__init__()
        self.lines: deque[str] = deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Answers(OrderedDict):
    """The answers given to questions, by question, the last given last. A question present with None is being
    worked on and stays. An answer is forgotten once it is older than ``ANSWER_KEPT_S`` and ``ANSWERS_KEPT``
    newer ones are kept: long enough for any repeat of its question (the controller repeats an unanswered one
    every few seconds, the outbox re-sends after a broker outage), and nothing held per request a service ran."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._clock = clock
        self._given: dict[Hashable, float] = {}

    def remember(self, question: Hashable, answer: Any) -> None:
        self[question] = answer
        self.move_to_end(question)
        now = self._given[question] = self._clock()
        for old in list(itertools.islice(self, max(0, len(self) - ANSWERS_KEPT))):
            if now - self._given[old] <= ANSWER_KEPT_S:
                break
            if self[old] is not None:
                del self[old], self._given[old]


class Worker:
    def __init__(self, spec: WorkerSpec, client: ControlClient, topics: Topics, log_tail: LogTail,
                 spec_path: Path | None = None):
        self.spec = spec
        self.spec_path = spec_path
        self.group: RankGroup | None = None  #: the follower ranks of a replica on several devices
        self.broken: str | None = None  #: why the group cannot compute any more
        self.client = client
        self.topics = topics
        self.log_tail = log_tail
        self.me = ReplicaRef(node=spec.node, replica=spec.replica)
        self.family = get_family(spec.family)
        self.inbound = InboundShapes(spec, self.family)
        self.progress = Progress()
        self.replies = Replies()
        self.stages: dict[str, Stage] = {}
        self.receivers: dict[str, Receiver] = {}
        self.senders: dict[str, Sender] = {}
        self.connected: set[tuple[str, str, int]] = set()
        self.peers: dict[tuple[str, int], Status] = {}  #: each peer's last announcement (not its will)
        self.suspects: dict[tuple[str, int], asyncio.TimerHandle] = {}  #: peers whose will came, judged later
        self.received: dict[tuple[str, str], tuple[Manifest, dict[str, Any]]] = {}  # (request, edge) -> payload
        self.waiting_grants: dict[str, deque[GrantRequest]] = {}
        self.jobs: asyncio.Queue[RunStage] = asyncio.Queue()
        self.results = Answers()  # (request, segment, attempt) -> StageDone / StageFailed; None while it runs
        self.grants = Answers()  # (request, edge, attempt) -> Grant; None while queued
        self.acks = Answers()  # (request, edge, attempt, delivery) -> Ack; None while verifying
        self.cancelled = Answers()  # request -> why it was dropped
        self.background: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.requests_done = 0
        self.queued_at: dict[tuple[str, int, int], float] = {}  #: run_stage question -> when it was queued
        self.threads = TorchThreads(spec.cpu_share, spec.threads, spec.cpu_budget)
        self.compute = ComputeThread()  #: where torch runs (engine.worker.threads)
        self.output_cache = OutputCache(spec.output_cache_bytes) if spec.output_cache_bytes else None
        self.streams: dict[str, VideoStream] = {}  #: stream files the collector grows from a remote decoder's chunks

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def status(self, state: str, **fields: Any) -> None:
        await self.client.publish(self.topics.status(self.spec.node, self.spec.replica),
                                  Status(node=self.spec.node, replica=self.spec.replica, state=state, pid=os.getpid(),
                                         host=socket.gethostname(), **fields), retain=True)

    async def farewell(self, state: str, **fields: Any) -> None:
        """Announce the last state if the broker can hear it soon; a stopping worker does not wait for it."""
        if self.client.connected:
            with contextlib.suppress(EngineError, TimeoutError):
                async with asyncio.timeout(FAREWELL_S):
                    await self.status(state, **fields)

    async def load(self) -> None:
        """Load the node's components, build its stages, open its edges, announce ready."""
        spec = self.spec
        await self.status("loading")
        started = time.perf_counter()
        if len(spec.devices) > 1:  # the other ranks load their weights while this one loads its own
            if self.spec_path is None:
                raise EngineError(f"{spec.node}[{spec.replica}] spans {len(spec.devices)} devices but has no spec file")
            self.group = await asyncio.to_thread(RankGroup.start, spec, self.spec_path)
        components = await self.compute.run(self.family.load_components, spec.task, spec.components,
                                            Path(spec.source), spec.device, spec.dtype)
        split = await asyncio.to_thread(self.group.join) if self.group is not None else None
        self.stages = await self.compute.run(self._build_stages, components, split)
        for edge in spec.inbound:
            self.receivers[edge.name] = await asyncio.to_thread(make_receiver, edge.transport, edge.name, edge.slot_bytes,
                                                                edge.slots, integrity=edge.integrity, **self._mooncake(edge))
        for edge in spec.outbound:
            self.senders[edge.name] = await asyncio.to_thread(make_sender, edge.transport, edge.name, edge.slot_bytes,
                                                              timeout_s=spec.transfer_timeout_s, integrity=edge.integrity,
                                                              **self._mooncake(edge))
        load_s = time.perf_counter() - started
        param_bytes = sum(components.parameter_bytes().values())
        log.info("loaded %s in %.2f s: %d parameter bytes", ", ".join(spec.stages), load_s, param_bytes)
        await self.status("ready", receive_edges={name: r.location for name, r in self.receivers.items()},
                          param_bytes=param_bytes, load_s=load_s)

    def _build_stages(self, components: Any, split: Any) -> dict[str, Stage]:
        """The node's stages on its components: each split across the group's ranks (``split``, a several-device
        replica), with its backends (a graph backend's parity gate runs the stage) and its output cache."""
        spec = self.spec
        weights = f"{spec.family}:{spec.task}:{spec.source}:{','.join(spec.components)}:{spec.dtype}:{spec.device}"
        stages = {}
        for name in spec.stages:
            stage = self.family.build_stage(spec.task, name, components, spec.device, spec.dtype, spec.configs)
            if split is not None:
                stage.split(split)
            stage = with_backends(stage, self.family, spec.task, spec.node, spec.backends.get(name, ()),
                                  spec.strict_backends, components, spec.device, spec.source, spec.limits)
            stages[name] = with_output_cache(stage, self.output_cache, weights)
        return stages

    def _mooncake(self, edge: EdgeEnd) -> dict[str, Any]:
        """Mooncake options of an edge end: its protocol and this node's NIC (None: the environment's)."""
        if edge.transport != "mooncake":
            return {}
        return {"protocol": edge.protocol, "device_name": self.spec.rdma_device}

    def close(self) -> None:
        for endpoint in [*self.senders.values(), *self.receivers.values()]:
            with contextlib.suppress(EngineError, OSError):
                endpoint.close()
        if self.group is not None:
            self.group.close()
        self.compute.close()

    async def subscribe(self) -> None:
        """Subscribe before announcing ready: the first run_stage may follow the announcement at once."""
        await self.client.subscribe(self.topics.inbox(self.spec.node, self.spec.replica))
        await self.client.subscribe(self.topics.all_status)

    async def serve(self) -> None:
        tasks = [asyncio.create_task(self._compute_loop(), name="compute"),
                 *([asyncio.create_task(self._watch_ranks(), name="ranks")] if self.group is not None else []),
                 asyncio.create_task(publish_heartbeats(self.client, self.topics.heartbeat(self.spec.node, self.spec.replica),
                                                        self.spec.node, self.spec.replica, self.progress,
                                                        self.spec.heartbeat_s), name="heartbeat")]
        for task in tasks:
            task.add_done_callback(self._task_ended)
        try:
            async for inbound in self.client.messages():
                if self._authentic(inbound):
                    self._on_message(inbound.message)
                if self.stopping.is_set():
                    break
        finally:
            for task in [*tasks, *self.background]:
                task.cancel()
            await asyncio.gather(*tasks, *self.background, return_exceptions=True)

    async def _watch_ranks(self) -> None:
        """A follower rank that dies while the replica idles ends the replica too: the group is one unit."""
        assert self.group is not None
        while (dead := self.group.dead_rank()) is None:
            await asyncio.sleep(RANK_CHECK_S)
        self._break(dead)

    def _break(self, why: str) -> None:
        if self.broken is None:
            log.error("the rank group is broken: %s; stopping", why)
            self.broken = why
        self.stopping.set()

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """A loop of this worker ended: say why and stop, rather than go on half deaf or half mute."""
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("%s loop failed: %s", task.get_name(), task.exception(), exc_info=task.exception())
        self.stopping.set()

    def _spawn(self, job: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``job`` in the background; kept until it ends, and its failure logged."""
        task = asyncio.create_task(job, name=name)
        self.background.add(task)
        task.add_done_callback(self._background_ended)

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), task.exception(), exc_info=task.exception())

    def _authentic(self, inbound: Inbound) -> bool:
        """Whether the signer of a message is the replica (or controller) it speaks for, and may send it here."""
        message = inbound.message
        allowed = inbound.sender == self.topics.signer_of(message)
        sender = getattr(message, "sender", None)
        if allowed and sender is not None:  # an edge message: from the other end of one of our inbound edges
            allowed = any(edge.name == message.edge and edge.peer == sender.node for edge in self.spec.inbound)
        if not allowed:
            self.client.rejected["impostor"] += 1
            log.warning("dropped %r signed by %r: not a message that client may send to %s[%d]", message.kind,
                        inbound.sender, self.spec.node, self.spec.replica)
        return allowed

    # -- messages ---------------------------------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, RunStage):
            question = (message.request_id, message.segment, message.attempt)
            if question not in self.results:
                self.results.remember(question, None)
                self.queued_at[question] = time.monotonic()
                self.jobs.put_nowait(message)
                self.progress.waiting = self.jobs.qsize()
            elif self.results[question] is not None:  # our answer was lost: give it again
                self.client.post(self.topics.controller, self.results[question])
        elif isinstance(message, GrantRequest):
            question = (message.request_id, message.edge, message.attempt)
            if question not in self.grants:
                self.grants.remember(question, None)
                self.waiting_grants.setdefault(message.edge, deque()).append(message)
                self._serve_grants(message.edge)
            elif self.grants[question] is not None:
                self._post_to(message.sender, self.grants[question])
        elif isinstance(message, Landed):
            receiver = self.receivers.get(message.edge)
            if receiver is not None:
                receiver.landed(message.slot, message.generation, message.request_id, message.ranges)
        elif isinstance(message, Delivered):
            question = (message.request_id, message.edge, message.attempt, message.delivery)
            if question not in self.acks:
                self.acks.remember(question, None)
                self._spawn(self._on_delivered(message), f"verifying {message.edge} for {message.request_id}")
            elif self.acks[question] is not None:
                self._post_to(message.sender, self.acks[question])
        elif isinstance(message, Grant):
            peer = (message.receiver.node, message.receiver.replica)
            self.replies.resolve(("grant", message.request_id, message.edge, message.attempt), message, peer)
        elif isinstance(message, Ack):
            peer = (message.receiver.node, message.receiver.replica)
            self.replies.resolve(("ack", message.request_id, message.edge, message.attempt, message.delivery), message, peer)
        elif isinstance(message, Fence):
            receiver = self.receivers.get(message.edge)
            if receiver is not None:
                receiver.fence(SlotGrant.model_validate(message.grant))
                self._serve_grants(message.edge)
        elif isinstance(message, Status):
            peer = (message.node, message.replica)
            self._clear_suspicion(peer)
            if message.state == "dead":  # a will: a broker going down publishes every client's
                self._suspect(peer, message.detail or "dead", self.client.reconnects)
                return
            self.peers[peer] = message
            if message.state in ("failed", "stopped"):
                self.replies.peer_died(peer, message.detail or message.state)
        elif isinstance(message, ReplicaRestarting):  # its old process is gone; the new one signs from 0
            peer = (message.node, message.replica)
            log.info("%s[%d] is being started again", *peer)
            self.client.forget_sender(self.topics.replica_client(*peer))
            self.peers.pop(peer, None)  # where to write comes with the new process's announcement
            self.connected = {known for known in self.connected if known[1:] != peer}
            self._clear_suspicion(peer)
            self.replies.peer_died(peer, "it is being started again")
        elif isinstance(message, Cancel):
            log.info("request %s dropped: %s", message.request_id, message.reason)
            self.cancelled.remember(message.request_id, message.reason)
            self._release_received(message.request_id)
            self._end_stream(message.request_id)
        elif isinstance(message, Shutdown):
            log.info("shutdown: %s", message.reason)
            self.stopping.set()
        elif isinstance(message, CpuShare):
            self.threads.share = message.share  # the compute thread applies it before its next stage

    def _clear_suspicion(self, peer: tuple[str, int]) -> None:
        """The peer spoke (or is being started again): its will, if one came, is not to be believed."""
        suspicion = self.suspects.pop(peer, None)
        if suspicion is not None:
            suspicion.cancel()

    def _suspect(self, peer: tuple[str, int], detail: str, reconnects: int, grace_s: float = WILL_GRACE_S) -> None:
        """A peer's will is believed once no status of it follows within the grace while we hear the broker (the
        peer, if alive, re-announces itself after the broker is back); until then its last announcement stands."""
        def judge() -> None:
            if not self.client.connected or self.client.reconnects != reconnects:  # we were away too: start again
                self._suspect(peer, detail, self.client.reconnects, WILL_GRACE_S + RECONNECT_ALLOWANCE_S)
            else:
                del self.suspects[peer]
                self.replies.peer_died(peer, detail)

        self.suspects[peer] = asyncio.get_running_loop().call_later(grace_s, judge)

    def _serve_grants(self, edge: str) -> None:
        """Grant slots to waiting senders in arrival order while slots are free."""
        queue = self.waiting_grants.get(edge)
        receiver = self.receivers.get(edge)
        while queue:
            request = queue[0]
            grant, error = None, None
            if receiver is None:
                error = f"{self.spec.node} does not receive on edge {edge!r}"
            else:
                try:
                    grant = receiver.grant(request.request_id, request.nbytes)
                except SlotsExhausted as exc:
                    if exc.retry_after_s is not None:
                        asyncio.get_running_loop().call_later(exc.retry_after_s, self._serve_grants, edge)
                    return  # a release or fence serves it later
                except TransportError as exc:
                    error = exc.detail
            queue.popleft()
            reply = Grant(request_id=request.request_id, edge=edge, attempt=request.attempt, receiver=self.me,
                          grant=grant.model_dump(mode="json") if grant else None, error=error)
            self.grants.remember((request.request_id, edge, request.attempt), reply)
            self._post_to(request.sender, reply)

    def _post_to(self, replica: ReplicaRef, message: Any) -> None:
        self.client.post(self.topics.inbox(replica.node, replica.replica), message)

    async def _on_delivered(self, message: Delivered) -> None:
        receiver = self.receivers[message.edge]
        manifest = Manifest.model_validate(message.manifest)
        ahead = receiver.hashed_ahead(manifest.slot, manifest.generation)
        started = time.perf_counter()
        expected = self.inbound.expected(message.edge, message.request)
        chunk = chunk_of(message.request_id) if self.spec.stream_video else None
        if chunk is not None:
            expected = chunk_expected(expected)
        ack, views = await asyncio.to_thread(accept, receiver, manifest, expected)  # hashing a large payload takes a while
        if views is not None and chunk is not None:
            await self._on_chunk(message, chunk, manifest, views)
        elif views is not None:
            early = f" ({human_bytes(ahead)} of it hashed as it landed)" if ahead else ""
            log.info("edge %r request %s: %s verified in %.1f ms%s", message.edge, message.request_id,
                     human_bytes(manifest.nbytes), (time.perf_counter() - started) * 1e3, early)
            stale = self.received.pop((message.request_id, message.edge), None)
            if stale is not None:  # an earlier attempt's payload: the retried request replaces it
                receiver.release(stale[0])
            self.received[(message.request_id, message.edge)] = (manifest, views)
            if message.request_id in self.cancelled:  # dropped while it was on its way: free the slot now
                self._release_received(message.request_id)
        reply = Ack(request_id=message.request_id, edge=message.edge, attempt=message.attempt, delivery=message.delivery,
                    receiver=self.me, ok=ack.ok, reason=ack.reason, tensors=list(ack.tensors), retryable=ack.retryable)
        self.acks.remember((message.request_id, message.edge, message.attempt, message.delivery), reply)
        self._post_to(message.sender, reply)

    # -- compute ----------------------------------------------------------------------------------------------

    async def _compute_loop(self) -> None:
        """Run jobs in order. The answer is posted (the outbox sends it after a broker outage) and kept: a
        controller that did not hear it asks again and gets it again."""
        while True:
            job = await self.jobs.get()
            self.progress.waiting = self.jobs.qsize()
            started = time.monotonic()
            waited = started - self.queued_at.pop((job.request_id, job.segment, job.attempt), started)
            answer: StageDone | StageFailed
            try:
                self._check_cancelled(job.request_id)
                done = await self._run_segment(job)
                answer = done.model_copy(update={"waited_s": waited, "busy_s": time.monotonic() - started})
            except Exception as exc:  # reported to the controller, which decides what the request does next
                log.log(logging.INFO if isinstance(exc, Cancelled) else logging.ERROR, "request %s failed: %s",
                        job.request_id, exc)
                answer = StageFailed(request_id=job.request_id, node=self.spec.node, replica=self.spec.replica,
                                     attempt=job.attempt, stage=self.progress.snapshot().stage, error_type=type(exc).__name__,
                                     error=str(exc), traceback_tail="".join(traceback.format_exc().splitlines(True)[-12:]),
                                     log_tail="\n".join(self.log_tail.lines))
                self._release_received(job.request_id)
                if isinstance(exc, GroupBroken):
                    self._break(str(exc))
            self.results.remember((job.request_id, job.segment, job.attempt), answer)
            self.client.post(self.topics.controller, answer)
            self.requests_done += 1
            self.progress.request_finished()
            await asyncio.to_thread(release_freed_memory)  # what the request freed goes back to the system

    async def _run_segment(self, job: RunStage) -> StageDone:
        spec = self.spec
        segment = next((s for s in spec.segments if s.index == job.segment), None)
        if segment is None:
            raise EngineError(f"node {spec.node!r} has no segment {job.segment}")

        # 1. Inputs: the verified payloads of every inbound edge this segment reads; the request's input files from
        #    the feeder (engine.plan.feeder) become files of this run, which the request then names.
        tensors: dict[str, Any] = {}
        files: dict[str, Any] = {}
        for edge in self._inbound_for(segment.inputs):
            held = self.received.get((job.request_id, edge.name))
            if held is None:
                raise TransportError(f"no verified payload for segment {segment.index}", edge=edge.name, request_id=job.request_id)
            (files if edge.peer == FEEDER else tensors).update(held[1])
        inputs_dir = Path(spec.out_dir) / ".inputs"
        fed_folder = inputs_dir / output_stem(inputs_dir, job.request_id)
        params = write_input_files(job.request, files, fed_folder) if files else job.request
        try:
            request = self.family.request_type(spec.task).model_validate(params)
            if spec.node == FEEDER:
                tensors = read_input_files(job.request, {t.name: t.nbytes for e in spec.outbound for t in e.declared})

            # 2. Stages, in order, on the compute thread; progress goes out with the heartbeats, previews as they come. A
            #    video this worker writes also grows as a stream file while it is decoded (engine.stream).
            every = cadence(request.preview_every, spec.preview.every if spec.preview else None)
            sink_for = functools.partial(self._preview_sink, job, every, asyncio.get_running_loop())
            stream = self._video_stream(job, segment, request)
            compute = (self._compute, job.request_id, segment.stages, with_node_cache(request, spec.cache), tensors, sink_for)
            timings, step_cache, cached = await self.compute.run(*((stream.feeding, *compute) if stream else compute))
        finally:
            if files:
                remove_input_files(fed_folder)

        # 3. Outgoing edges: each to the replica the controller chose.
        self._check_cancelled(job.request_id)
        edge_stats = {}
        for edge in spec.outbound:
            payload = {name: tensors[name] for name in edge.tensors if name in tensors and name in segment.outputs}
            if payload:
                edge_stats[edge.name] = await self._send(edge, job, payload)

        # 4. Final outputs (decoded frames): files in the run's output folder.
        outputs: list[str] = []
        finals = {name: tensors[name] for name in spec.final_outputs if name in segment.outputs}
        self._end_stream(job.request_id)
        if finals:
            out_dir = Path(spec.out_dir)
            paths = await self.compute.run(self.family.write_output, request, finals, out_dir, output_stem(out_dir, job.request_id),
                                            meta={**spec.meta, "request_id": job.request_id}, save_frames=spec.save_frames)
            outputs = [str(p) for p in paths]
        self._release_received(job.request_id)
        return StageDone(request_id=job.request_id, node=spec.node, replica=spec.replica, attempt=job.attempt,
                         timings=timings, edges=edge_stats, outputs=outputs, peak_rss_bytes=peak_rss_bytes(),
                         step_cache=step_cache, backends=stage_uses(self.stages, segment.stages),
                         cached={stage: outcome.hit for stage, outcome in cached.items()},
                         saved_s=sum(outcome.saved_s for outcome in cached.values()))

    def _compute(self, request_id: str, stages: tuple[str, ...], request: Any, tensors: dict[str, Any],
                 sink_for: Callable[[str], Sink | None]) -> tuple[dict[str, float], dict[str, StepCacheStats], dict[str, Any]]:
        """Run the stages: their seconds, what the step caches they opened for this request did, and how each
        output-cached stage's outputs came (hit or miss). A stage's previews go to ``sink_for(stage)``."""
        self.threads.apply()
        timings, step_cache, cached = {}, {}, {}
        for name in stages:
            self.progress.stage_started(request_id, name, 0)

            def progress(step: int, total: int, _name: str = name) -> None:
                if self.group is not None:  # every rank goes on, or every rank stops, at this step
                    self.group.step(request_id not in self.cancelled)
                self._check_cancelled(request_id)  # a dropped request stops at the next step
                if step == 1 or self.progress.snapshot().total_steps != total:
                    self.progress.stage_started(request_id, _name, total)
                self.progress.step_done(step)

            started = time.perf_counter()
            stage = self.stages[name]
            with collect_step_caches() as caches, previews(sink_for(name)):
                tensors.update(self._run_stage(stage, request, tensors, progress))
            timings[name] = time.perf_counter() - started
            if caches:
                step_cache[name] = functools.reduce(StepCacheStats.plus, (cache.stats for cache in caches))
            hits = []
            if isinstance(stage, CachedStage):
                cached.update(stage.last)
                hits = [part for part, outcome in stage.last.items() if outcome.hit]
            log.info("request %s: %s took %.3f s%s", request_id, name, timings[name],
                     f" (outputs from the cache: {', '.join(hits)})" if hits else "")
        return timings, step_cache, cached

    def _preview_sink(self, job: RunStage, every: int, loop: asyncio.AbstractEventLoop, stage: str) -> Sink | None:
        """Where a stage's previews go, every ``every`` steps: to the controller, posted from the event loop (the
        stage runs on the compute thread). Only this process opens one: a follower rank's loop makes no preview."""
        if not every:
            return None

        def emit(picture: Picture) -> None:
            message = Preview(request_id=job.request_id, node=self.spec.node, replica=self.spec.replica, attempt=job.attempt,
                              stage=stage, step=picture.step, total_steps=picture.total, width=picture.width,
                              height=picture.height, jpeg_b64=base64.b64encode(picture.jpeg).decode())
            loop.call_soon_threadsafe(self.client.post, self.topics.controller, message)

        return Sink(every, emit)

    def _run_stage(self, stage: Stage, request: Any, tensors: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Run a stage here, and on a several-device replica on every rank: the followers get the request and the
        stage's inputs first; a collective that fails is the rank that broke it."""
        if self.group is None:
            return stage.run(request, tensors, progress)
        try:
            inputs = {name: tensors[name] for name in stage.spec.inputs if name in tensors}
            self.group.hand_over(stage.spec.name, request.model_dump(mode="json"), inputs)
            return stage.run(request, tensors, progress)
        except RuntimeError as exc:  # torch.distributed's errors (a peer gone, a timeout) are RuntimeErrors
            raise self.group.broken(exc) from exc

    def _video_stream(self, job: RunStage, segment: SegmentSpec, request: Any) -> VideoStream | ChunkSender | None:
        """Where the frames of a video this segment decodes go as they are made, when streaming is on: the stream
        file, when this worker writes the video; the collector, when it does (engine.stream.remote)."""
        fps = getattr(request, "fps", None)
        if not self.spec.stream_video or fps is None or not segment.stages:
            return None
        check = functools.partial(self._check_cancelled, job.request_id)
        if set(self.spec.final_outputs) & set(segment.outputs):
            return VideoStream(self._out_dir, output_stem(self._out_dir, job.request_id), fps, check)
        to_collector = [(edge, name) for edge in self.spec.outbound if edge.peer == COLLECTOR
                        for name in edge.tensors if name in segment.outputs]
        if len(to_collector) != 1:
            return None
        ((edge, name),) = to_collector
        loop = asyncio.get_running_loop()

        def send(key: str, tensors: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(self._send(edge, job, tensors, key=key), loop).result()

        return ChunkSender(job.request_id, name, send, check)

    @property
    def _out_dir(self) -> Path:
        return Path(self.spec.out_dir)

    async def _on_chunk(self, message: Delivered, chunk: tuple[str, int], manifest: Manifest, views: dict[str, Any]) -> None:
        """A chunk of a remote decoder's frames (engine.stream.remote): onto the request's stream file, its slot
        freed. Chunk 0 starts the file (again, for a request that is run again)."""
        request_id, index = chunk
        fps = message.request.get("fps")
        try:
            if index == 0:
                self._end_stream(request_id)
                if isinstance(fps, int) and fps > 0:
                    self.streams[request_id] = VideoStream(self._out_dir, output_stem(self._out_dir, request_id), fps,
                                                           functools.partial(self._check_cancelled, request_id))
            stream = self.streams.get(request_id)
            if stream is not None:
                (frames,) = views.values()
                with contextlib.suppress(Cancelled):  # dropped meanwhile: the Cancel ends the file
                    await asyncio.to_thread(stream, frames)
        finally:
            self.receivers[message.edge].release(manifest)
            self._serve_grants(message.edge)

    def _end_stream(self, request_id: str) -> None:
        """End a stream file the collector grows (the outputs came, or the request was dropped)."""
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.writer.close()
            log.info("request %s: streamed %d frames in %d chunks from a remote decoder to %s", request_id,
                     stream.writer.frames, stream.writer.chunks, stream.path.name)

    def _inbound_for(self, names: tuple[str, ...]) -> list[EdgeEnd]:
        return [e for e in self.spec.inbound if set(e.tensors) & set(names)]

    def _check_cancelled(self, request_id: str) -> None:
        """Raise Cancelled if the controller dropped this request (read from the compute thread too)."""
        reason = self.cancelled.get(request_id)
        if reason is not None:
            raise Cancelled(f"dropped: {reason}")

    def _release_received(self, request_id: str) -> None:
        """Return the receive slots a request's verified payloads hold, and grant them to waiting senders."""
        for edge in self.spec.inbound:
            held = self.received.pop((request_id, edge.name), None)
            if held is not None:
                self.receivers[edge.name].release(held[0])
                self._serve_grants(edge.name)

    async def _send(self, edge: EdgeEnd, job: RunStage, payload: dict[str, Any], *, key: str | None = None) -> EdgeStats:
        """Send ``payload`` for the job's request (or under ``key``: a stream chunk, engine.stream.remote)."""
        replica = job.send_to.get(edge.name)
        if replica is None:
            raise EngineError(f"run_stage for {job.request_id} names no target replica for edge {edge.name!r}")
        sender = self.senders[edge.name]
        if (edge.name, edge.peer, replica) not in self.connected:
            peer = self.peers.get((edge.peer, replica))
            if peer is None or peer.receive_edges is None or edge.name not in peer.receive_edges:
                raise TransportError(f"{edge.peer}[{replica}] has not announced where to write", edge=edge.name,
                                     request_id=job.request_id)
            await asyncio.to_thread(sender.connect, peer.receive_edges[edge.name])
            self.connected.add((edge.name, edge.peer, replica))
        link = MqttEdgeLink(edge=edge.name, client=self.client, topics=self.topics, replies=self.replies, me=self.me,
                            target=ReplicaRef(node=edge.peer, replica=replica), attempt=job.attempt,
                            timeout_s=self.spec.transfer_timeout_s, request=job.request)
        started = time.perf_counter()
        manifest = await send_tensors(sender, link, payload, key or job.request_id, retries=edge.retries)
        return EdgeStats(nbytes=manifest.nbytes, tensor_bytes=sum(h.nbytes for h in manifest.tensors),
                         seconds=time.perf_counter() - started, digest=manifest.digest, rejected=link.deliveries - 1)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM), falling back to the current RSS."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


async def run_worker(spec: WorkerSpec, secrets: WorkerSecrets, spec_path: Path | None = None) -> int:
    topics = Topics(spec.run_id)
    tls = spec.broker.get("tls")
    address = BrokerAddress(**{**spec.broker, "password": secrets.broker_password,
                               "tls": TLSOptions(**tls) if tls is not None else None})
    tail = LogTail()
    tail.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(tail)
    will = LastWill(topics.status(spec.node, spec.replica),
                    Status(node=spec.node, replica=spec.replica, state="dead", pid=os.getpid(), host=socket.gethostname(),
                           detail="connection lost without a goodbye (process died or hung)"))
    # A long keepalive: loading weights can starve the event loop for seconds, and a broker that drops us then
    # would publish our last will. A hung worker is caught by its missing heartbeats instead; a dead one closes
    # its socket, which fires the will at once.
    client = ControlClient(address, client_id=topics.replica_client(spec.node, spec.replica), key=secrets.key, will=will,
                           keepalive_s=60, broker_timeout_s=spec.broker_timeout_s)
    await client.connect()
    worker = Worker(spec, client, topics, tail, spec_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stopping.set)
    stop_task = asyncio.create_task(worker.stopping.wait())
    try:
        await worker.status("starting")
        await worker.subscribe()
        await worker.load()
        serve = asyncio.create_task(worker.serve())
        await asyncio.wait([serve, stop_task], return_when=asyncio.FIRST_COMPLETED)
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        if worker.broken is not None:
            await worker.farewell("failed", detail=worker.broken)
            return 1
        await worker.farewell("stopped")
        return 0
    except Exception as exc:
        log.error("worker failed: %s", exc, exc_info=not isinstance(exc, EngineError))
        await worker.farewell("failed", detail=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        stop_task.cancel()
        worker.close()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    spec = WorkerSpec.read(Path(argv[0]))
    secrets = WorkerSecrets.model_validate_json(sys.stdin.readline())
    # The heavy imports happen before the broker connection, not while the event loop should be answering it.
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    TorchThreads(spec.cpu_share, spec.threads, spec.cpu_budget).start()

    return asyncio.run(run_worker(spec, secrets, Path(argv[0])))


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    # Exit now: the transfer engine's native threads can keep a finished interpreter from ever exiting.
    os._exit(code)
