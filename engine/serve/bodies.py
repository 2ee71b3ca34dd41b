"""The API's request bodies, shaped like OpenAI's video and image APIs as SGLang and vLLM-Omni serve them, and
their translation into the served graph family's request.

Validation happens here, before a job is queued: unknown fields, wrong types, values the family refuses and
sizes over what the deployment's edge buffers hold are all answered with the field named (HTTP 422).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.plan.build import sizing_request
from engine.plan.check import CheckedGraph
from engine.spec.schema import StepCacheSpec
from engine.stages import CHECK_FILES, RequestParams

MAX_PROMPT_CHARS = 20_000
#: API field -> the family request field it sets, where the names differ.
RENAMED = {"num_inference_steps": "steps"}
API_NAME = {"steps": "num_inference_steps"}


class InvalidRequest(Exception):
    """A request body the service refuses; ``problems`` are (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems))
        self.problems = problems


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$", description="WIDTHxHEIGHT, e.g. 832x480")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    cache: StepCacheSpec | None = Field(None, description="step caching for this job over the DiT node's: "
                                                          "teacache:0.2, {method: fbcache, threshold: 0.1} or none")
    preview_every: int | None = Field(None, description="a preview of the denoising every N steps, over the DiT node's "
                                                        "preview setting (events, GET .../preview); 0: none")


class VideoBody(Body):
    """POST /v1/videos."""

    seconds: float | None = Field(None, gt=0, le=600, description="length; frames = seconds x fps + 1")
    num_frames: int | None = None
    fps: int | None = None
    flow_shift: float | None = None


class ImageBody(Body):
    """POST /v1/images/generations and /v1/images/edits."""

    n: int = Field(1, ge=1, le=1, description="images per request (this service makes one)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    true_cfg_scale: float | None = None


@dataclass(frozen=True)
class Translated:
    params: RequestParams
    api: dict[str, Any]  #: what the API shows besides the params (size, seconds, response_format)


def validate_body(body_type: type[Body], raw: Mapping[str, Any]) -> Body:
    try:
        return body_type.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidRequest([(".".join(map(str, e["loc"])) or "body", _message(e)) for e in exc.errors()]) from None


def _message(error: Any) -> str:
    text = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "not a field of this API"
    if error["type"] == "string_too_long":
        return f"longer than {error['ctx']['max_length']} characters"
    return text


def translate(checked: CheckedGraph, body: Body, image: tuple[str, Path] | None = None) -> Translated:
    """The family request for ``body`` (and the uploaded ``image``: its form field and where it was saved) over the
    graph's request defaults, checked against what the deployment's edge buffers hold; InvalidRequest names every
    field at fault."""
    model = checked.loaded.spec.model
    request_type = checked.family.request_type(model.task)
    fields = request_type.model_fields
    given = body.model_dump(exclude_none=True, exclude={"model", "size", "seconds", "n", "response_format"})
    problems: list[tuple[str, str]] = []
    if body.size is not None:
        width, height = (int(v) for v in body.size.split("x"))
        for name, value in (("width", width), ("height", height)):
            if name in given and given[name] != value:
                problems.append(("size", f"{body.size} disagrees with {name}={given[name]}"))
            given[name] = value
    seconds = getattr(body, "seconds", None)
    if seconds is not None:
        if "num_frames" in given:
            problems.append(("seconds", "give seconds or num_frames, not both"))
        fps = given.get("fps", checked.request_defaults.get("fps", fields["fps"].default if "fps" in fields else 16))
        given["num_frames"] = round(seconds * fps) + 1
    values = {RENAMED.get(name, name): value for name, value in given.items()}
    if image is not None:
        values["image"] = image[1]
    api_name = {**API_NAME, "image": image[0] if image else "image"}
    unknown = [name for name in values if name not in fields]
    problems += [(api_name.get(name, name), f"not a field of {model.family} {model.task} requests") for name in unknown]
    if problems:
        raise InvalidRequest(problems)
    try:
        params = request_type.model_validate({**checked.request_defaults, **values}, context=CHECK_FILES)
    except ValidationError as exc:
        raise InvalidRequest([(_api_field(e, api_name, seconds is not None, image), _message(e)) for e in exc.errors()]) from None
    problems = [(API_NAME.get(name, name), f"{value} is over the {limit} this service's edge buffers hold; restart it "
                                           f"with --set limits.{name}={value}")
                for name, value, limit in over_limits(checked, params)]
    if problems:
        raise InvalidRequest(problems)
    api = {"size": f"{params.width}x{params.height}"} if hasattr(params, "width") and hasattr(params, "height") else {}
    if hasattr(params, "num_frames") and hasattr(params, "fps"):
        api["seconds"] = f"{(params.num_frames - 1) / params.fps:g}"
    if isinstance(body, ImageBody):
        api["response_format"] = body.response_format
    return Translated(params, api)


def _api_field(error: Any, api_name: Mapping[str, str], from_seconds: bool, image: tuple[str, Path] | None) -> str:
    """The API field an error of the family's request is about (a whole-request rule naming the uploaded image is
    about the image)."""
    name = ".".join(map(str, error["loc"]))
    if not name:
        return image[0] if image is not None and str(image[1]) in error["msg"] else "body"
    if name == "num_frames" and from_seconds:
        return "seconds"
    return api_name.get(name, name)


def over_limits(checked: CheckedGraph, params: RequestParams) -> list[tuple[str, int, int]]:
    """Size fields of ``params`` above what the deployment sized its edges for: (field, value, limit)."""
    sizing = sizing_request(checked)
    return [(name, getattr(params, name), getattr(sizing, name)) for name in type(params).size_fields
            if getattr(params, name) > getattr(sizing, name)]
