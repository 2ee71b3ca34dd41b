"""The requests of a run: the graph's own, or one given on the command line, checked against the plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.errors import RequestError
from engine.plan.check import CheckedGraph
from engine.plan.model import Plan
from engine.stages import RequestParams

#: ``engine run`` options that set request parameters, by parameter name.
CLI_FIELDS = ("prompt", "negative_prompt", "image", "seed", "steps", "height", "width", "num_frames")


def check_limits(plan: Plan, request: RequestParams, label: str) -> None:
    for name, limit in plan.limits.items():
        value = getattr(request, name)
        if value > limit:
            raise RequestError(f"{label}: {name}={value} exceeds what the graph's edge buffers are sized for "
                               f"({name} <= {limit}); raise limits.{name} in the graph (or --set limits.{name}={value})")


def build_request(checked: CheckedGraph, values: dict[str, Any], label: str) -> RequestParams:
    request_type = checked.family.request_type(checked.loaded.spec.model.task)
    try:
        request = request_type.model_validate({**checked.request_defaults, **values}).resolve_paths(Path.cwd())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" if e["loc"]
            else e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise RequestError(f"{label}: {problems}") from None
    for name, value in request:
        if isinstance(value, Path) and not value.is_file():
            raise RequestError(f"{label}: {name}: no such file: {value}")
    return request


def requests_from_args(plan: Plan, checked: CheckedGraph, args: argparse.Namespace) -> list[RequestParams]:
    """With --prompt: one request (graph defaults + options). Other options alone override the graph's requests."""
    given = {name: getattr(args, name) for name in CLI_FIELDS if getattr(args, name, None) is not None}
    if "prompt" in given or not plan.requests:
        if "prompt" not in given and "prompt" not in checked.request_defaults:
            raise RequestError(f"{plan.file} declares no requests: give one with --prompt (see engine run --help)")
        requests = [build_request(checked, given, "the command-line request")]
    else:
        requests = [r.model_copy(update=given) if given else r for r in plan.requests]
        if given:  # re-validate: the options may break a rule
            requests = [build_request(checked, r.model_dump(), f"request {i + 1}") for i, r in enumerate(requests)]
    for i, request in enumerate(requests):
        check_limits(plan, request, f"request {i + 1}")
    return requests
