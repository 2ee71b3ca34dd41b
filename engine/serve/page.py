"""The service's page and the two endpoints it reads.

    GET /                      the page: the graph drawn with its replicas' live state, the jobs, a form to submit
    GET /page/{file}           its script modules and style (static files under engine/serve/page; no build step)
    GET /v1/service            the graph (nodes, replicas, hosts, devices; edges, transport, bytes per request), the
                               model, the endpoint and fields it takes, and the state now
    GET /v1/service/events     server-sent events: ``jobs`` (the latest jobs, once), then ``job`` (a job on every
                               change) and ``state`` (replicas, queue depth, health, whenever they change)

The page and its files are public: they hold nothing of the service. ``/v1/service*`` want the bearer token like
the rest of ``/v1``. A browser's EventSource cannot send an Authorization header, so the page reads the events
with ``fetch()`` and parses the stream itself: the token never goes into a URL, where access logs and proxies
would keep it. For the same reason the page fetches videos and images with the header and plays them from blobs
when a token is set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import annotated_types
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from engine.plan.model import PlannedEdge
from engine.plan.shapes import evaluate_shape
from engine.serve.jobs import Job, api_object
from engine.serve.service import Service
from engine.stages import DTYPE_BYTES, RequestParams

PAGE = Path(__file__).with_name("page")
STATE_S = 0.25  #: how often the replicas' state is looked at for changes
RECENT_JOBS = 50  #: jobs the page gets when it connects
FORM_FIELDS = ("width", "height", "num_frames", "steps", "seed", "negative_prompt")
BOUNDED_FIELDS = ("width", "height", "num_frames", "steps")  #: the form's number boxes with a range


def add_page(app: FastAPI, service: Service) -> None:
    """Register the page, its files and ``/v1/service[/events]`` on ``app``."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html")

    app.mount("/page", StaticFiles(directory=PAGE), name="page")

    @app.get("/v1/service")
    async def service_graph() -> dict[str, Any]:
        return {**describe(service), "state": state(service)}

    @app.get("/v1/service/events")
    async def service_events() -> EventSourceResponse:
        return EventSourceResponse(events(service), ping=15)


SCALE_EVENTS_SHOWN = 5


def describe(service: Service) -> dict[str, Any]:
    """What does not change while the service runs: the model, what it takes, the graph as planned."""
    plan = service.controller.fleet.plan  # where nodes placed on ``any`` host went
    default = service.request_type.model_construct(**service.checked.request_defaults)
    symbols = service.checked.family.shape_symbols(plan.task, plan.configs, default)
    return {
        "model": {"id": service.model, "family": plan.family, "task": plan.task, "path": plan.model_path,
                  "dtype": plan.dtype},
        "endpoint": endpoint(service),
        "image_field": ("input_reference" if service.makes_video else "image") if service.takes_image else None,
        "makes_video": service.makes_video,
        "defaults": {name: getattr(default, name) for name in FORM_FIELDS if name in service.request_type.model_fields},
        "limits": plan.limits,
        "bounds": bounds(service.request_type, plan.limits),
        "nodes": [{"name": node.name, "stages": list(node.stages), "host": node.host, "device": node.device,
                   "replicas": node.most_replicas} for node in plan.nodes.values()],
        "edges": [{"name": edge.name, "from": edge.source, "to": edge.target, "transport": edge.transport,
                   "protocol": edge.protocol, "tensors": list(edge.tensor_names),
                   "bytes_per_request": edge_bytes(edge, symbols), "slot_bytes": edge.slot_bytes}
                  for edge in plan.edges],
        "graph": plan.graph,
    }


def bounds(request_type: type[RequestParams], limits: dict[str, int]) -> dict[str, dict[str, int]]:
    """The range of each bounded form field: the family's request bounds, the upper one at most what the
    deployment's edge buffers hold (its limits)."""
    found = {}
    for name in BOUNDED_FIELDS:
        if name not in request_type.model_fields:
            continue
        metadata = request_type.model_fields[name].metadata
        low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
        if name in limits:
            high = limits[name] if high is None else min(high, limits[name])
        found[name] = {key: value for key, value in (("min", low), ("max", high)) if value is not None}
    return found


def endpoint(service: Service) -> str:
    if service.makes_video:
        return "/v1/videos"
    return "/v1/images/edits" if service.takes_image else "/v1/images/generations"


def edge_bytes(edge: PlannedEdge, symbols: dict[str, int]) -> int:
    """Bytes the edge carries for a request at the service's defaults (optional tensors included)."""
    total = 0
    for tensor in edge.tensors:
        count = DTYPE_BYTES[tensor.dtype]
        for dim in evaluate_shape(tensor.expression, symbols):
            count *= dim
        total += count
    return total


def state(service: Service) -> dict[str, Any]:
    """What changes: health, queue depth, running jobs and every replica's state."""
    _, health = service.health()
    autoscaler = service.controller.autoscaler
    return {"status": health["status"], "queued": health["queued"], "running": health["running"],
            "replicas": [asdict(replica) for replica in service.replicas()],
            "scale_events": [asdict(event) for event in list(autoscaler.events)[-SCALE_EVENTS_SHOWN:]] if autoscaler else []}


def page_job(job: Job) -> dict[str, Any]:
    """A job as the API shows it, with the prompt, steps, frames and frame rate it asked for (for the page's
    progress bars and the video's length: ``num_frames / fps``; the API's ``seconds`` is ``(num_frames - 1) / fps``,
    as a request's ``seconds`` makes ``seconds x fps + 1`` frames)."""
    return {**api_object(job), "prompt": job.params.get("prompt"), "steps": job.params.get("steps"),
            "num_frames": job.params.get("num_frames"), "fps": job.params.get("fps")}


async def events(service: Service) -> AsyncIterator[dict[str, str]]:
    """The latest jobs, then every job change and every change of state, as server-sent events, until the service
    has stopped."""
    changes: asyncio.Queue[Job] = asyncio.Queue()
    pump = asyncio.create_task(_forward(service.follow_all(), changes))
    try:
        await asyncio.sleep(0)  # the pump follows every job before the list is taken: no change falls in between
        recent = [service.get(job.id) or job for job in service.store.list(limit=RECENT_JOBS)]
        yield {"event": "jobs", "data": json.dumps([page_job(job) for job in recent])}
        shown = None
        while not service.stopped:  # a stopped service's stream ends, or the HTTP server would wait on it
            try:
                async with asyncio.timeout(STATE_S):
                    job = await changes.get()
                yield {"event": "job", "data": json.dumps(page_job(job))}
            except TimeoutError:
                pass
            now = state(service)
            if now != shown:
                shown = now
                yield {"event": "state", "data": json.dumps(now)}
    finally:
        pump.cancel()


async def _forward(jobs: AsyncIterator[Job], queue: asyncio.Queue[Job]) -> None:
    async for job in jobs:
        queue.put_nowait(job)
