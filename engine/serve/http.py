"""The HTTP API, shaped like OpenAI's video and image APIs as SGLang and vLLM-Omni serve them.

    POST   /v1/videos                  create a video job (JSON, or multipart with an input_reference image)
    GET    /v1/videos                  list jobs (limit, after, order)
    GET    /v1/videos/{id}             a job: status, progress 0-100, error {code, message}
    GET    /v1/videos/{id}/content     the video (video/mp4; range requests)
    GET    /v1/videos/{id}/content?stream=true   while the job runs: the video as it is decoded, a fragmented
                                       MP4 growing with chunked transfer until the job ends (engine.stream)
    GET    /v1/videos/{id}/events      server-sent events: the job on every change (``progress``, ``done``) and its
                                       denoising previews (``preview``: step, total_steps, stage, a JPEG data URL)
    GET    /v1/videos/{id}/preview     the job's latest denoising preview (image/jpeg; 404 before the first)
    DELETE /v1/videos/{id}             cancel a job that has not finished; delete one that has
    POST   /v1/images/generations      text to image, answered when done (b64_json or url)
    POST   /v1/images/edits            image edit (multipart: image, prompt, ...)
    GET    /v1/images/{id}/content     an image job's PNG
    GET    /v1/images/{id}/preview     an image job's latest denoising preview (image/jpeg)
    GET    /v1/models                  the model served
    GET    /v1/service[/events]        the graph, its replicas and jobs, live (for the page; engine/serve/page.py)
    GET    /                           the page: the graph drawn, live state, jobs, a form to submit
    GET    /health                     200 when every node has a ready replica, else 503
    GET    /health/live                200 while the process answers (liveness)
    GET    /metrics                    Prometheus metrics

Errors are ``{"error": {"message", "type", "param", "code"}}``; a body at fault gets 4xx naming the field and
nothing in the server log. With a token configured, /v1 wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from sse_starlette.sse import EventSourceResponse

from engine.control.messages import Preview
from engine.plan.feeder import DEFAULT_FILE_BYTES
from engine.serve.api_errors import ApiError, BearerAuth, BodyLimit, add_error_handlers, refused_as_api_errors
from engine.serve.bodies import ImageBody, VideoBody
from engine.serve.jobs import Job, api_object
from engine.serve.metrics import CONTENT_TYPE
from engine.serve.page import add_page
from engine.serve.reading import FormReader, parse_json_object
from engine.serve.service import Service

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png",)


@dataclass(frozen=True)
class ApiOptions:
    token: str | None = None  #: bearer token wanted on /v1; None: open
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = DEFAULT_FILE_BYTES  #: also what the edge carrying uploads to other hosts holds
    max_image_pixels: int = 8192 * 8192


def preview_event(preview: Preview) -> dict[str, Any]:
    """A ``preview`` server-sent event: where the denoising is, and the picture as a data URL an <img> shows."""
    return {"step": preview.step, "total_steps": preview.total_steps, "stage": preview.stage, "width": preview.width,
            "height": preview.height, "image": f"data:image/jpeg;base64,{preview.jpeg_b64}"}


def create_app(service: Service, options: ApiOptions = ApiOptions()) -> FastAPI:
    checked = service.checked
    makes_video, takes_image = service.makes_video, service.takes_image
    app = FastAPI(title=f"engine serve: {service.model}", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")

    add_error_handlers(app)
    app.add_middleware(BearerAuth, token=options.token)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)  # type: ignore[arg-type]
    forms = FormReader(service.options.uploads, takes_image=takes_image, max_image_bytes=options.max_image_bytes,
                       max_image_pixels=options.max_image_pixels)

    # -- bodies -----------------------------------------------------------------------------------------------

    async def read_body(request: Request, image_field: str, job_id: str) -> tuple[dict[str, Any], tuple[str, Path] | None]:
        """The body's fields, and the uploaded image saved under the service's uploads as ``<job id>.<ext>``."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):
            return await forms.read(request, image_field, job_id)
        return parse_json_object(await request.body(), image_field), None

    async def create(request: Request, body_type: type[VideoBody] | type[ImageBody], image_field: str,
                     kind: str) -> Job:
        """Read, check and queue a job; a refused one leaves no upload behind."""
        job_id = service.new_id(kind)
        with service.receiving(job_id):
            raw, image = await read_body(request, image_field, job_id)
            if kind == "image" and takes_image and image is None:
                raise ApiError(422, "image: the image to edit is missing (a file in the multipart body)", param="image")
            with refused_as_api_errors():
                return service.accept(job_id, kind, body_type, raw, image)

    def admit() -> None:
        with refused_as_api_errors():
            service.admit()

    def find(job_id: str, kind: str) -> Job:
        job = service.get(job_id)
        if job is None or job.object != kind:
            raise ApiError(404, f"no {kind} job {job_id!r}", param="id", code="not_found")
        return job

    # -- videos -----------------------------------------------------------------------------------------------

    def videos_only() -> None:
        if not makes_video:
            raise ApiError(404, f"this service's model ({checked.loaded.spec.model.family}) makes images: use "
                                "/v1/images/generations", code="wrong_endpoint")

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        videos_only()
        admit()  # before reading an upload
        return JSONResponse(api_object(await create(request, VideoBody, "input_reference", "video")))

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20, after: str | None = None, order: str = "desc") -> dict[str, Any]:
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise ApiError(422, "limit is 1-100 and order asc or desc", param="limit" if order in ("asc", "desc") else "order")
        jobs = service.store.list(limit=limit + 1, after=after, order=order)  # type: ignore[arg-type]
        data = [api_object(service.get(j.id) or j) for j in jobs[:limit] if j.object == "video"]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str) -> dict[str, Any]:
        return api_object(find(job_id, "video"))

    @app.delete("/v1/videos/{job_id}")
    async def delete_video(job_id: str) -> dict[str, Any]:
        job = find(job_id, "video")
        if job.finished:
            service.delete(job_id)
            return {"id": job_id, "object": "video.deleted", "deleted": True}
        cancelled = service.cancel(job_id)
        return api_object(cancelled or job)

    @app.get("/v1/videos/{job_id}/content")
    async def video_content(job_id: str, stream: bool = False) -> Response:
        job = find(job_id, "video")
        if stream and not job.finished:
            return StreamingResponse(service.stream_video(job_id), media_type="video/mp4",
                                     headers={"Cache-Control": "no-store"})
        return content(job, VIDEO_SUFFIXES, "video/mp4")

    @app.get("/v1/videos/{job_id}/events")
    async def video_events(job_id: str) -> EventSourceResponse:
        find(job_id, "video")

        async def events() -> Any:
            sent = None
            async for job in service.follow(job_id):
                preview = service.preview(job_id)
                if preview is not sent and preview is not None and not job.finished:
                    sent = preview
                    yield {"event": "preview", "data": json.dumps(preview_event(preview))}
                yield {"event": "done" if job.finished else "progress", "data": json.dumps(api_object(job))}

        return EventSourceResponse(events(), ping=15)

    @app.get("/v1/videos/{job_id}/preview")
    async def video_preview(job_id: str) -> Response:
        return preview_image(find(job_id, "video"))

    def preview_image(job: Job) -> Response:
        preview = service.preview(job.id)
        if preview is None:
            raise ApiError(404, f"job {job.id} has no preview (yet): previews come every N denoising steps when the "
                                "DiT node's preview or the job's preview_every asks for them", code="no_preview")
        return Response(base64.b64decode(preview.jpeg_b64), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    def content(job: Job, suffixes: tuple[str, ...], media_type: str) -> FileResponse:
        if job.status != "completed":
            raise ApiError(409, f"job {job.id} is {job.status}: its content exists once it is completed",
                           code="not_completed")
        path = job.output(suffixes)
        if path is None or not path.is_file():
            raise ApiError(410, f"job {job.id}'s output is gone (removed by the retention limits)", code="gone")
        return FileResponse(path, media_type=media_type, filename=f"{job.id}{path.suffix}")

    # -- images -----------------------------------------------------------------------------------------------

    async def image_job(request: Request, edit: bool) -> dict[str, Any]:
        if makes_video:
            raise ApiError(404, "this service's model makes videos: use /v1/videos", code="wrong_endpoint")
        if edit != takes_image:
            raise ApiError(404, "this service's model " + ("edits an image: use /v1/images/edits" if takes_image
                                                           else "takes no image: use /v1/images/generations"),
                           code="wrong_endpoint")
        admit()
        job = await create(request, ImageBody, "image", "image")
        async for job in service.follow(job.id):
            pass
        if job.status != "completed":
            raise ApiError(500, f"job {job.id} {job.status}: {job.error_message or 'cancelled'}", code=job.error_code or job.status)
        path = job.output(IMAGE_SUFFIXES)
        if path is None:
            raise ApiError(500, f"job {job.id} completed without an image", code="no_output")
        item = {"url": f"/v1/images/{job.id}/content"} if job.api.get("response_format") == "url" else {
            "b64_json": base64.b64encode(await asyncio.to_thread(path.read_bytes)).decode()}
        return {"created": int(job.created_at), "id": job.id, "data": [item]}

    @app.post("/v1/images/generations")
    async def generate_image(request: Request) -> dict[str, Any]:
        return await image_job(request, edit=False)

    @app.post("/v1/images/edits")
    async def edit_image(request: Request) -> dict[str, Any]:
        return await image_job(request, edit=True)

    @app.get("/v1/images/{job_id}/content")
    async def image_content(job_id: str) -> FileResponse:
        return content(find(job_id, "image"), IMAGE_SUFFIXES, "image/png")

    @app.get("/v1/images/{job_id}/preview")
    async def image_preview(job_id: str) -> Response:
        return preview_image(find(job_id, "image"))

    # -- service ----------------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model, "object": "model", "created": int(service.started),
                                            "owned_by": "engine"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, detail = service.health()
        return JSONResponse(detail, status_code=200 if ok else 503)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """The process answers (a liveness probe: unlike /health, a node down does not make it fail)."""
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    add_page(app, service)
    return app
