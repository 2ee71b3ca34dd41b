"""The requests of ``engine run``: the graph's own, or one given on the command line, checked against the
graph's family and its explicit limits before anything is planned."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.errors import RequestError
from engine.plan.check import CheckedGraph
from engine.controller.request_options import option_flag
from engine.stages import RequestParams


def build_request(checked: CheckedGraph, values: dict[str, Any], label: str,
                  options: Collection[str] = ()) -> RequestParams:
    """Validate ``values`` over the graph's defaults; a problem with a field in ``options`` (given on the
    command line) names the option (``--steps``) rather than the field."""
    request_type = checked.family.request_type(checked.loaded.spec.model.task)
    try:
        request = request_type.model_validate({**checked.request_defaults, **values}).resolve_paths(Path.cwd())
    except ValidationError as exc:
        raise RequestError(f"{label}: " + "; ".join(_problem(error, options) for error in exc.errors())) from None
    for name, value in request:
        if isinstance(value, Path) and not value.is_file():
            raise RequestError(f"{label}: {name}: no such file: {value}")
    return request


def _problem(error: Any, options: Collection[str]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    name = ".".join(map(str, error["loc"]))
    if name not in options:
        return f"{name}: {message}"
    if error["type"] == "value_error":  # the family's own message, which names the value
        return f"{option_flag(name)}: {message}"
    return f"{option_flag(name)}: got {error['input']!r}; {message[0].lower()}{message[1:]}"


def check_fields(checked: CheckedGraph, given: Mapping[str, Any]) -> None:
    """Every field given on the command line is one of the graph's request model (``engine run`` offers the
    fields of every family)."""
    model = checked.loaded.spec.model
    fields = checked.family.request_type(model.task).model_fields
    unknown = [option_flag(name) for name in given if name not in fields]
    if unknown:
        raise RequestError(f"{', '.join(unknown)}: not {'an option' if len(unknown) == 1 else 'options'} of "
                           f"{model.family} {model.task} requests ({checked.loaded.lines.file}); "
                           f"valid: {', '.join(option_flag(name) for name in fields)}")


def check_limits(checked: CheckedGraph, requests: Sequence[RequestParams]) -> None:
    """Every request within the graph's explicit limits, a ceiling on the edge buffers; every excess at once.

    Size parameters the graph does not limit need no check: the planner sizes the edges for these requests.
    """
    limits = checked.loaded.spec.limits
    excess = [(i, name, getattr(request, name), limit) for i, request in enumerate(requests, 1)
              for name, limit in limits.items() if getattr(request, name) > limit]
    if not excess:
        return
    needed: dict[str, int] = {}
    for _, name, value, _ in excess:
        needed[name] = max(needed.get(name, 0), value)
    count = f"{len(excess)} value{'s' if len(excess) > 1 else ''}"
    raise RequestError(
        f"{count} over the limits {checked.loaded.lines.file} sets on its edge buffers:\n"
        + "".join(f"  request {i}: {name}={value} exceeds limits.{name} = {limit}\n" for i, name, value, limit in excess)
        + "raise them in the graph, or with " + " ".join(f"--set limits.{name}={value}" for name, value in needed.items()))


def run_requests(checked: CheckedGraph, given: Mapping[str, Any]) -> list[RequestParams]:
    """With a prompt given: one request (graph defaults + ``given``). Other fields alone override every
    request of the graph."""
    check_fields(checked, given)
    if "prompt" in given or not checked.requests:
        if "prompt" not in given and "prompt" not in checked.request_defaults:
            raise RequestError(f"{checked.loaded.lines.file} declares no requests: give one with --prompt "
                               "(see engine run --help)")
        requests = [build_request(checked, dict(given), "the command-line request", given)]
    elif given:  # re-validate: the values may break a rule
        requests = [build_request(checked, {**r.model_dump(), **given}, f"request {i}", given)
                    for i, r in enumerate(checked.requests, 1)]
    else:
        requests = list(checked.requests)
    check_limits(checked, requests)
    return requests
