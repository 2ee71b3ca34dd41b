"""The service: one deployment of a graph kept warm, jobs in, results and progress out.

Jobs are admitted (bounded queue, validated bodies), written to the :class:`~engine.serve.jobs.JobStore`, and
submitted to the deployment's scheduler with a deadline each. A sync loop mirrors the scheduler's requests into
the jobs (status, progress from the denoising steps, outputs, errors naming node and stage) and wakes whoever
follows a job (server-sent events, MQTT replies). :meth:`Service.stop` drains: new jobs get 503, running ones
may finish within the grace period, jobs still queued stay queued in the store and run after a restart, and
whatever still runs then is interrupted (failed, ``interrupted``) before every worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.controller.controller import Controller
from engine.controller.scheduler import Scheduler
from engine.controller.tracker import State, TrackedRequest
from engine.control.broker import BrokerAddress
from engine.control.messages import Preview
from engine.plan.check import CheckedGraph
from engine.serve.bodies import API_NAME, Body, InvalidRequest, Translated, translate, validate_body
from engine.serve.jobs import Job, JobStatus, JobStore, Retention
from engine.serve.metrics import ServiceMetrics
from engine.stream.fmp4 import stream_path
from engine.stream.follow import follow_growing

log = logging.getLogger("engine.serve")

SYNC_S = 0.1
ORPHAN_SWEEP_S = 60.0  #: at most this often, uploads of no job are removed (after a job finishes)
STATUS: dict[State, JobStatus] = {State.QUEUED: "queued", State.RUNNING: "in_progress", State.DONE: "completed",
                                  State.FAILED: "failed", State.CANCELLED: "cancelled"}
INTERRUPTED = "interrupted"
PREVIEWS_KEPT = 256  #: jobs whose latest preview is kept in memory (each at most 64 KiB), the oldest dropped first


class Unavailable(Exception):
    """The service takes no job now (starting up too long is not this: jobs queue then); HTTP 503."""


class QueueFull(Exception):
    """HTTP 429; ``retry_after_s`` estimates when a place frees up."""

    def __init__(self, queued: int, retry_after_s: int):
        super().__init__(f"the queue is full ({queued} jobs waiting); retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Conflict(Exception):
    """The job cannot do that in its state (cancel a finished job)."""


class UnknownModel(Exception):
    """A job names a model this service does not serve."""


@dataclass(frozen=True)
class ReplicaSnapshot:
    """A replica as :meth:`Service.replicas` sees it now."""

    node: str
    replica: int
    state: str  #: down, busy (running a segment of ``job``), or what it last announced (starting, loading, ready)
    pid: int | None
    down: str | None  #: why it is out of service
    stage: str | None  #: the stage it runs for ``job``, from its heartbeats
    job: str | None
    step: int  #: denoising steps of ``stage`` done, of ``total_steps`` (0 of 0: not step-based, or not started)
    total_steps: int


@dataclass(frozen=True)
class ServiceOptions:
    state_dir: Path
    queue_size: int = 64  #: jobs waiting (not yet running) beyond which new ones get 429
    job_timeout_s: float = 3600.0  #: a job not finished this long after it was accepted fails
    grace_s: float = 30.0  #: on stop, how long running jobs may go on
    retention: Retention = field(default_factory=Retention)

    @property
    def outputs(self) -> Path:
        return self.state_dir / "outputs"

    @property
    def uploads(self) -> Path:
        return self.state_dir / "uploads"


class Service:
    def __init__(self, controller: Controller, checked: CheckedGraph, options: ServiceOptions):
        self.controller = controller
        self.checked = checked
        spec = checked.loaded.spec
        self.model = spec.name  #: the model id clients name (``model`` in a body); the model's path is accepted too
        self.aliases = {spec.name, spec.model.path}
        self.request_type = checked.family.request_type(spec.model.task)
        self.makes_video = "num_frames" in self.request_type.model_fields
        self.takes_image = "image" in self.request_type.model_fields
        self.options = options
        options.uploads.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(options.state_dir / "jobs.sqlite")
        self.metrics = ServiceMetrics(self)
        self.scheduler: Scheduler | None = None
        self.started = time.time()
        self.draining = False
        self.stopped = False  #: every worker is stopped: followers end
        self._live: dict[str, Job] = {}  #: jobs not finished, by id
        self._interrupting: set[str] = set()
        self._receiving: set[str] = set()  #: jobs whose body (and upload) is being read and checked
        self._swept_at = 0.0
        self._followers: dict[str, set[asyncio.Queue[Job | None]]] = {}  #: None ends a follower: the service stopped
        self._watchers: set[asyncio.Queue[Job | None]] = set()  #: those following every job
        self._previews: OrderedDict[str, Preview] = OrderedDict()  #: each job's latest preview, by job id
        self._stop = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def run(self, front: Callable[[BrokerAddress], Awaitable[None]] | None = None) -> None:
        """Deploy, take jobs until :meth:`stop` (also through ``front``, given the broker once it is up), drain,
        stop every worker."""
        self._recover()
        async with self.controller.deployed() as scheduler:
            self.scheduler = scheduler
            for job in self._live.values():
                self._submit_to_scheduler(job)
            log.info("ready: %d job(s) waiting from before", len(self._live))
            loop = asyncio.create_task(self.controller.serve_until(lambda: self._stop.is_set() and not self._running()),
                                       name="controller")
            helpers = [asyncio.create_task(self._sync_loop(), name="sync"), asyncio.create_task(self._drain(), name="drain")]
            if front is not None:
                assert self.controller.address is not None
                helpers.append(asyncio.create_task(front(self.controller.address), name="mqtt"))
            try:
                await asyncio.wait([loop, *helpers], return_when=asyncio.FIRST_COMPLETED)
                for task in helpers:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                await loop
            finally:
                for task in [loop, *helpers]:
                    task.cancel()
                await asyncio.gather(loop, *helpers, return_exceptions=True)
                self._sync()
                self.scheduler = None
                self.stopped = True
                for queue in [*self._watchers, *(q for queues in self._followers.values() for q in queues)]:
                    queue.put_nowait(None)  # streams end, so the HTTP server can stop
        self.store.close()

    def stop(self) -> None:
        """Stop taking jobs and drain (SIGTERM)."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.admitting = False  # queued jobs stay queued in the store, for the next start
        self._stop.set()

    async def _drain(self) -> None:
        """After stop: running jobs get the grace period, then are interrupted."""
        await self._stop.wait()
        deadline = time.monotonic() + self.options.grace_s
        while self._running() and time.monotonic() < deadline:
            await asyncio.sleep(SYNC_S)
        assert self.scheduler is not None
        for request in list(self.scheduler.requests):
            if request.state == State.RUNNING:
                self._interrupting.add(request.id)
                self.scheduler.cancel(request.id, f"{INTERRUPTED}: the service stopped ({self.options.grace_s:g} s grace passed)")
        self._sync()

    def _running(self) -> int:
        return self.scheduler.running if self.scheduler else 0

    def _recover(self) -> None:
        """Jobs from before a restart: queued ones run again, running ones failed as interrupted; uploads of no
        job are removed."""
        self._remove_orphaned_uploads()
        for job in self.store.with_status("in_progress"):
            self._finish(job, "failed", INTERRUPTED, "interrupted: the service stopped while the job ran; submit it again")
        for job in self.store.with_status("queued"):
            self._live[job.id] = job

    # -- health -----------------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        """Whether every node has a live replica (and the service takes jobs), with the replicas per node."""
        fleet = self.controller.fleet
        nodes = {name: sum(r.down is None and r.state == "ready" for r in fleet.replicas.values() if r.node == name)
                 for name in fleet.plan.nodes}
        if self.draining:
            status = "stopping"
        elif self.scheduler is None:
            status = "starting"
        else:
            status = "ok" if all(nodes.values()) else "degraded"
        return status == "ok", {"status": status, "nodes": nodes, "queued": self.queued, "running": self._running()}

    @property
    def queued(self) -> int:
        return sum(job.status == "queued" for job in self._live.values())

    # -- jobs -------------------------------------------------------------------------------------------------

    def new_id(self, kind: str) -> str:
        return f"{kind}_{uuid.uuid4().hex[:24]}"

    def admit(self) -> None:
        """Raise unless a new job may be queued now."""
        if self.draining:
            raise Unavailable("the service is stopping and takes no new jobs")
        if self.queued >= self.options.queue_size:
            raise QueueFull(self.queued, self._retry_after_s())

    @contextlib.contextmanager
    def receiving(self, job_id: str) -> Iterator[None]:
        """While a job's body is read, checked and queued: its upload is no orphan, and if the job is refused (any
        exception) its upload is removed."""
        self._receiving.add(job_id)
        try:
            yield
        except BaseException:
            self._remove_uploads(job_id)
            raise
        finally:
            self._receiving.discard(job_id)

    def accept(self, job_id: str, kind: str, body_type: type[Body], raw: Mapping[str, Any],
               image: tuple[str, Path] | None = None, origin: str = "http") -> Job:
        """Validate a job's body (InvalidRequest, UnknownModel) and queue it (QueueFull, Unavailable)."""
        body = validate_body(body_type, raw)
        if body.model is not None and body.model not in self.aliases:
            raise UnknownModel(f"model: {body.model!r} is not served here; this service serves {self.model!r}")
        translated = translate(self.checked, body, image)
        # The model's geometry (a size off its token grid), by the rule the plan and the stages apply.
        off_grid = self.checked.family.request_problems(self.checked.loaded.spec.model.task,
                                                        self.controller.plan.configs, translated.params)
        if off_grid:
            raise InvalidRequest([(API_NAME.get(p.field, p.field), p.message) for p in off_grid])
        return self.submit(job_id, kind, translated, origin)

    def find_origin(self, origin: str) -> Job | None:
        return self.store.find_origin(origin)

    def submit(self, job_id: str, kind: str, translated: Translated, origin: str = "http") -> Job:
        """Queue a validated job under ``job_id`` (from :meth:`new_id`; an upload may already be named after it)."""
        self.admit()
        job = Job(id=job_id, object=kind, model=self.model,  # type: ignore[arg-type]
                  params=translated.params.model_dump(mode="json"), api=translated.api, origin=origin)
        self.store.add(job)
        self._live[job.id] = job
        if self.scheduler is not None:
            self._submit_to_scheduler(job)
        self.metrics.accepted(job)
        self._notify(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._live.get(job_id) or self.store.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job that has not finished (Conflict if it has); None if there is no such job."""
        job = self.get(job_id)
        if job is None:
            return None
        if job.finished:
            raise Conflict(f"job {job_id} is {job.status} already")
        if self.scheduler is not None and self.scheduler.cancel(job_id, "cancelled by the client") is not None:
            self._sync()
        else:  # not handed to the scheduler yet (the deployment is starting)
            self._finish(job, "cancelled", None, None)
        return self.get(job_id)

    async def follow(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then on every change until it has finished or the service has stopped."""
        queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self._followers.setdefault(job_id, set()).add(queue)
        try:
            job = self.get(job_id)
            while job is not None:
                yield job
                if job.finished or self.stopped:
                    return
                job = await queue.get()
        finally:
            self._followers[job_id].discard(queue)
            if not self._followers[job_id]:
                del self._followers[job_id]

    async def follow_all(self) -> AsyncIterator[Job]:
        """Every job on every change (accepted, progress, finished), until the caller or the service stops."""
        queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            while (job := await queue.get()) is not None:
                yield job
        finally:
            self._watchers.discard(queue)

    async def stream_video(self, job_id: str) -> AsyncIterator[bytes]:
        """The job's video while it is made: its stream file (a fragmented MP4, engine.stream) up to the last whole
        fragment, on as the file grows, until the job has finished (or the service has stopped). A job that completed
        without a stream file (its frames came whole, from another host or a stage's output cache) gets its video.
        Nothing here makes the job wait: the worker writes its file, each reader follows it at its own pace."""
        wake = asyncio.Event()

        async def watch_job() -> None:
            async for _ in self.follow(job_id):
                wake.set()

        def ended() -> bool:
            job = self.get(job_id)
            return job is None or job.finished or self.stopped

        watcher = asyncio.create_task(watch_job(), name=f"following {job_id}")
        sent = 0
        try:
            async for data in follow_growing(stream_path(self.options.outputs, job_id), ended, wake):
                sent += len(data)
                yield data
            job = self.get(job_id)
            video = job.output((".mp4",)) if job is not None and job.status == "completed" and not sent else None
            if video is not None and video.is_file():
                yield await asyncio.to_thread(video.read_bytes)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def replicas(self) -> list[ReplicaSnapshot]:
        """Every replica now: starting, ready, busy with a job (its stage and step) or down (and why)."""
        fleet = self.controller.fleet
        running = {(fleet.plan.segments[r.segment].node, r.replica_of.get(r.segment)): r
                   for r in (self.scheduler.requests if self.scheduler else ()) if r.state == State.RUNNING}
        snapshot = []
        for info in fleet.replicas.values():
            request = running.get(info.key)
            stage = self.controller.view.current_stage(*info.key) if request else None
            step, total = request.steps.get((info.node, stage), (0, 0)) if request and stage else (0, 0)
            state = "down" if info.down else "busy" if request else info.state
            snapshot.append(ReplicaSnapshot(info.node, info.replica, state, info.pid, info.down, stage,
                                            request.id if request else None, step, total))
        return snapshot

    def _submit_to_scheduler(self, job: Job) -> None:
        assert self.scheduler is not None
        params = self.request_type.model_validate(job.params)
        remaining = self.options.job_timeout_s - (time.time() - job.created_at)
        self.scheduler.submit(params, job.id, deadline_s=max(remaining, 0.0))
        self.controller.wake()  # dispatched now, not at the controller's next tick

    def _retry_after_s(self) -> int:
        """How long until a queue place frees up, from the jobs finished so far (at least 1 s)."""
        per_job = self.metrics.mean_job_s() or 10.0
        parallel = self.scheduler.in_flight_cap if self.scheduler else 1
        return max(1, round(per_job / parallel))

    # -- mirroring the scheduler ------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        """Jobs follow their requests every ``SYNC_S`` (progress), and at once when a request ends."""
        while True:
            self._sync()
            if self.scheduler is None:
                await asyncio.sleep(SYNC_S)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_S):
                    await self.scheduler.ended.wait()
            self.scheduler.ended.clear()

    def _sync(self) -> None:
        if self.scheduler is None:
            return
        for request in list(self.scheduler.requests):
            job = self._live.get(request.id)
            if job is None:
                continue
            status, progress = STATUS[request.state], round(request.progress * 100)
            if request.finished:
                self._finished_request(job, request)
                self.scheduler.forget(request.id)
            elif self._took_preview(job, request) or (status, progress) != (job.status, job.progress):
                if status == "in_progress" and job.started_at is None:
                    job.started_at = time.time()
                job.status, job.progress = status, progress
                self.store.save(job)
                self._notify(job)

    def preview(self, job_id: str) -> Preview | None:
        """The job's latest preview, if it made one (kept for the :data:`PREVIEWS_KEPT` latest jobs)."""
        return self._previews.get(job_id)

    def _took_preview(self, job: Job, request: TrackedRequest) -> bool:
        """Keep the request's latest preview if it is new, its step and size in the job (the API shows them)."""
        preview = request.preview
        if preview is None or self._previews.get(job.id) is preview:
            return False
        self._previews[job.id] = preview
        self._previews.move_to_end(job.id)
        while len(self._previews) > PREVIEWS_KEPT:
            self._previews.popitem(last=False)
        job.api = {**job.api, "preview": {"step": preview.step, "total_steps": preview.total_steps, "stage": preview.stage,
                                          "width": preview.width, "height": preview.height}}
        return True

    def _finished_request(self, job: Job, request: TrackedRequest) -> None:
        self.metrics.finished(request)
        self._took_preview(job, request)  # the last one, if it came since the last sync
        if request.state == State.DONE:
            job.outputs = list(request.outputs)
            job.api = {**job.api, "step_cache": {stage: s.model_dump() for stage, s in request.step_cache.items()}}
            job.output_bytes = sum(Path(p).stat().st_size for p in request.outputs if Path(p).is_file())
            # The final video supersedes the stream file: readers holding it open read on to its end, later ones
            # get the final video (stream_video); a cancelled or failed job keeps what was decoded.
            stream_path(self.options.outputs, job.id).unlink(missing_ok=True)
            self._finish(job, "completed", None, None)
        elif request.id in self._interrupting:
            self._finish(job, "failed", INTERRUPTED, request.events[-1].detail)
        elif request.state == State.CANCELLED:
            self._finish(job, "cancelled", None, None)
        else:
            error = request.error or "failed"
            self._finish(job, "failed", "deadline_exceeded" if "deadline" in error.splitlines()[0] else "generation_failed",
                         error)

    def _finish(self, job: Job, status: JobStatus, code: str | None, message: str | None) -> None:
        job.status, job.error_code, job.error_message = status, code, message
        job.progress = 100 if status == "completed" else job.progress
        job.finished_at = time.time()
        self.store.save(job)
        self._live.pop(job.id, None)
        self._interrupting.discard(job.id)
        self._notify(job)
        self._apply_retention()

    def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its files."""
        job = self.store.get(job_id)
        if job is not None and job.finished:
            self.store.delete(job_id)
            self._previews.pop(job_id, None)
            self._remove_files(job)

    def _apply_retention(self) -> None:
        for dropped in self.store.prune(self.options.retention):
            self._remove_files(dropped)
        if time.monotonic() - self._swept_at > ORPHAN_SWEEP_S:
            self._remove_orphaned_uploads()

    def _remove_files(self, job: Job) -> None:
        for path in [*job.outputs, stream_path(self.options.outputs, job.id)]:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        self._remove_uploads(job.id)

    def _remove_uploads(self, job_id: str) -> None:
        for upload in self.options.uploads.glob(f"{job_id}.*"):
            upload.unlink(missing_ok=True)

    def _remove_orphaned_uploads(self) -> None:
        """Remove uploads that belong to no job kept in the store nor to one being received (left by a service
        killed while it read a body, or by versions that kept refused jobs' uploads)."""
        self._swept_at = time.monotonic()
        kept = self.store.ids() | self._receiving
        for upload in self.options.uploads.iterdir():
            if upload.is_file() and upload.name.split(".", 1)[0] not in kept:
                upload.unlink(missing_ok=True)

    def _notify(self, job: Job) -> None:
        for queue in (*self._followers.get(job.id, ()), *self._watchers):
            queue.put_nowait(job)
