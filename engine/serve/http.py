"""The HTTP API, shaped like OpenAI's video and image APIs as SGLang and vLLM-Omni serve them.

    POST   /v1/videos                  create a video job (JSON, or multipart with an input_reference image)
    GET    /v1/videos                  list jobs (limit, after, order)
    GET    /v1/videos/{id}             a job: status, progress 0-100, error {code, message}
    GET    /v1/videos/{id}/content     the video (video/mp4; range requests)
    GET    /v1/videos/{id}/events      server-sent events: the job on every change, until it ends
    DELETE /v1/videos/{id}             cancel a job that has not finished; delete one that has
    POST   /v1/images/generations      text to image, answered when done (b64_json or url)
    POST   /v1/images/edits            image edit (multipart: image, prompt, ...)
    GET    /v1/images/{id}/content     an image job's PNG
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
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from engine.plan.feeder import DEFAULT_FILE_BYTES
from engine.serve.bodies import ImageBody, InvalidRequest, VideoBody
from engine.serve.jobs import Job, api_object
from engine.serve.metrics import CONTENT_TYPE
from engine.serve.page import add_page
from engine.serve.service import QueueFull, Service, Unavailable, UnknownModel

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png",)


@dataclass(frozen=True)
class ApiOptions:
    token: str | None = None  #: bearer token wanted on /v1; None: open
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = DEFAULT_FILE_BYTES  #: also what the edge carrying uploads to other hosts holds
    max_image_pixels: int = 8192 * 8192


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers, self.problems = status, param, code, headers, problems

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"message": str(self), "type": "invalid_request_error" if self.status < 500 else "server_error",
                                 "param": self.param, "code": self.code or ("invalid_request" if self.status < 500 else "error")}
        if self.problems:
            error["problems"] = [{"param": name, "message": text} for name, text in self.problems]
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413), by Content-Length or as they stream in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is over {self.max_bytes} bytes", code="body_too_large").response()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, f"the request body is over {self.max_bytes} bytes", code="body_too_large")
            return message

        return await self.app(scope, limited, send)


def create_app(service: Service, options: ApiOptions = ApiOptions()) -> FastAPI:
    checked = service.checked
    makes_video, takes_image = service.makes_video, service.takes_image
    app = FastAPI(title=f"engine serve: {service.model}", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if options.token and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {options.token}".encode()):
                return ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)  # type: ignore[arg-type]

    # -- bodies -----------------------------------------------------------------------------------------------

    async def read_body(request: Request, image_field: str, job_id: str) -> tuple[dict[str, Any], tuple[str, Path] | None]:
        """The body's fields, and the uploaded image saved under the service's uploads as ``<job id>.<ext>``."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_part_size=options.max_image_bytes)
            except MultiPartException as exc:
                raise ApiError(400, f"body: malformed form data: {exc.message}", param="body") from None
            fields: dict[str, Any] = {}
            image = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != image_field:
                        raise ApiError(422, f"{name}: no file is expected here (the image goes in {image_field})", param=name)
                    image = (name, await save_image(value, name, job_id))
                else:
                    fields[name] = value
            return fields, image
        try:
            raw = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body: not valid JSON ({exc})", param="body") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "body: expected a JSON object", param="body")
        if image_field in raw:
            raise ApiError(422, f"{image_field}: send the image as a file in a multipart/form-data body", param=image_field)
        return raw, None

    async def save_image(upload: UploadFile, field: str, job_id: str) -> Path:
        if not takes_image:
            raise ApiError(422, f"{field}: this service's model takes no image", param=field)
        data = await upload.read()
        if len(data) > options.max_image_bytes:
            raise ApiError(413, f"{field}: the image is over {options.max_image_bytes} bytes", param=field)
        suffix = check_image_bytes(data, field, options.max_image_pixels)
        path = service.options.uploads / f"{job_id}{suffix}"
        await asyncio.to_thread(path.write_bytes, data)
        return path

    def create(body_type: type[VideoBody] | type[ImageBody], raw: dict[str, Any], image: tuple[str, Path] | None,
               job_id: str, kind: str) -> Job:
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
        job_id = service.new_id("video")
        raw, image = await read_body(request, "input_reference", job_id)
        return JSONResponse(api_object(create(VideoBody, raw, image, job_id, "video")))

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
    async def video_content(job_id: str) -> FileResponse:
        return content(find(job_id, "video"), VIDEO_SUFFIXES, "video/mp4")

    @app.get("/v1/videos/{job_id}/events")
    async def video_events(job_id: str) -> EventSourceResponse:
        find(job_id, "video")

        async def events() -> Any:
            async for job in service.follow(job_id):
                yield {"event": "done" if job.finished else "progress", "data": json.dumps(api_object(job))}

        return EventSourceResponse(events(), ping=15)

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
        job_id = service.new_id("image")
        raw, image = await read_body(request, "image", job_id)
        if edit and image is None:
            raise ApiError(422, "image: the image to edit is missing (a file in the multipart body)", param="image")
        job = create(ImageBody, raw, image, job_id, "image")
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


@contextlib.contextmanager
def refused_as_api_errors() -> Iterator[None]:
    """The service's refusals of a job as the API answers them."""
    try:
        yield
    except UnknownModel as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    except InvalidRequest as exc:
        raise ApiError(422, str(exc), param=exc.problems[0][0], code="invalid_value", problems=exc.problems) from None
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after_s)}) from None
    except Unavailable as exc:
        raise ApiError(503, str(exc), code="stopping") from None


def check_image_bytes(data: bytes, field: str, max_pixels: int) -> str:
    """The file suffix of an uploaded PNG/JPEG/WebP; ApiError (422) for anything else, or a decompression bomb."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ApiError(422, f"{field}: {image.width}x{image.height} is over {max_pixels} pixels", param=field)
            image.verify()
            kind = image.format
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ApiError(422, f"{field}: not a readable image ({exc})", param=field) from None
    if kind not in ("PNG", "JPEG", "WEBP"):
        raise ApiError(422, f"{field}: a {kind} image; send PNG, JPEG or WebP", param=field)
    return {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[kind]

