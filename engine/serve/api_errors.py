"""Errors as the API answers them, and the two gates every request passes first (body size, bearer token).

Every 4xx and 5xx is ``{"error": {"message", "type", "param", "code"}}``, the ones FastAPI and Starlette raise
themselves included (a malformed query parameter, an unknown path, a wrong method, an internal error). The gates are plain ASGI
middleware: an error raised while a body streams in reaches the app's handlers as itself, not wrapped in the
task group of Starlette's ``BaseHTTPMiddleware``.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.serve.bodies import InvalidRequest
from engine.serve.service import QueueFull, Unavailable, UnknownModel

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


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


def add_error_handlers(app: FastAPI) -> None:
    """Answer ApiError, and the framework's own refusals, in the API's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:  # Starlette logs it, then answers this
        return ApiError(500, f"internal error ({type(exc).__name__}); the service's log has the details").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(str(error["loc"][-1]) if error["loc"] else "request", str(error["msg"])) for error in exc.errors()]
        return ApiError(422, "; ".join(f"{name}: {text}" for name, text in problems), param=problems[0][0],
                        code="invalid_value", problems=problems).response()


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


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413): at once by Content-Length, or once a streamed (chunked) body
    passes it, by raising ApiError to whoever reads it."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.max_bytes} bytes", code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large()
            return message

        return await self.app(scope, limited, send)


class BearerAuth:
    """With a token, requests under ``/v1/`` want ``Authorization: Bearer <token>`` (the scheme in any case, as
    RFC 9110 has it); others get 401."""

    def __init__(self, app: Any, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token and scope["path"].startswith("/v1/") and not self._allowed(scope):
            refused = ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await refused.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        assert self.token is not None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token.encode())
