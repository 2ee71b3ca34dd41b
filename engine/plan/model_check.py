"""The graph's model against its family: can the family's stages run a model with these configs?

Reads the config of every weighted component folder (JSON only: no torch, no weight), asks the family what
in them its stages cannot run (each problem naming its config field), then evaluates every stage's declared
outputs at the largest request, so that a geometry no stage can produce is refused here, before any worker
starts. Then every request, request default and limit of the graph goes through the family's request rule
(:meth:`~engine.stages.ModelFamily.request_problems`: sizes off the model's token grid), each problem at the
line that gave the value, and so do the requests of a run (:func:`check_requests`). ``engine validate``,
``engine plan`` and ``engine run`` all go through :func:`check_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import ModelError, Problem, RequestError, SpecError
from engine.models.meta import read_component_config
from engine.plan.check import CheckedGraph
from engine.plan.parallel import check_sequence
from engine.plan.shapes import ShapeExpressionError, evaluate_shape
from engine.stages import Configs, ModelFamily, RequestParams


def component_configs(family: ModelFamily, task: str, source: Path) -> dict[str, dict[str, Any]]:
    """Parsed config.json of every weighted component folder ``task`` uses, by folder."""
    folders = sorted({c.folder for c in family.components(task).values() if c.weights})
    return {folder: read_component_config(source, folder) for folder in folders}


def check_model(checked: CheckedGraph, source: Path, sizing: RequestParams) -> dict[str, dict[str, Any]]:
    """The model's component configs once the family can run them at ``sizing`` (the largest request);
    SpecError at ``model.path`` naming every config field the family cannot run otherwise."""
    spec, family = checked.loaded.spec, checked.family
    task = spec.model.task
    configs = component_configs(family, task, source)
    found = [f"{source}/{problem}" for problem in family.check_configs(task, configs)]
    if not found:
        found = _unproducible_outputs(checked, configs, sizing)
    if found:
        what = f"{spec.model.family} {task} cannot run this model: "
        raise SpecError([checked.loaded.lines.problem(("model", "path"), what + problem) for problem in found])
    problems = _graph_request_problems(checked, configs)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))  # a default at fault is reported once, not per request
    split_problems = check_sequence(checked, configs, sizing)
    if split_problems:
        raise SpecError(split_problems)
    return configs


def model_source(checked: CheckedGraph, *, build: bool) -> Path | None:
    """The local folder of the graph's ``model.path``: a preset is built on first use with ``build``, else None
    while not built yet. A model the family refuses for this task is a problem at ``model.path``."""
    model = checked.loaded.spec.model
    try:
        if build:
            return checked.family.resolve_source(model.task, model.path)
        return checked.family.find_source(model.task, model.path)
    except ModelError as exc:
        raise SpecError([checked.loaded.lines.problem(("model", "path"), str(exc))]) from None


def check_requests(checked: CheckedGraph, configs: Configs, requests: Sequence[RequestParams]) -> None:
    """RequestError naming every field of a run's ``requests`` (numbered from 1) the model cannot take."""
    task = checked.loaded.spec.model.task
    found = [f"request {i}: {problem}" for i, request in enumerate(requests, 1)
             for problem in checked.family.request_problems(task, configs, request)]
    if found:
        raise RequestError(f"{checked.loaded.spec.model.family} {task} cannot run "
                           f"{'this request' if len(requests) == 1 else 'these requests'} on this model:\n  "
                           + "\n  ".join(found))


def _graph_request_problems(checked: CheckedGraph, configs: Configs) -> list[Problem]:
    """The family's request rule on the graph's requests, on its defaults (a graph without requests: a service's
    requests take them) and on its limits, each problem at the line that gave the value: a request's own, else the
    default's."""
    spec, lines, family = checked.loaded.spec, checked.loaded.lines, checked.family
    task = spec.model.task
    request_type = family.request_type(task)
    given: list[tuple[tuple[Any, ...], dict[str, Any], RequestParams]] = [
        (("requests", i), overrides, request) for i, (overrides, request) in enumerate(zip(spec.requests, checked.requests))]
    if not spec.requests:
        given.append((("request",), {}, request_type.model_construct(**spec.request)))
    problems = []
    for at, overrides, request in given:
        for problem in family.request_problems(task, configs, request):
            if problem.field in overrides:
                problems.append(lines.problem((*at, problem.field), problem.message))
            elif problem.field in spec.request:
                problems.append(lines.problem(("request", problem.field), problem.message))
            else:
                problems.append(lines.problem(at, f"{problem.field}: {problem.message} (the family's default; set "
                                                  f"request.{problem.field})"))
    at_limits = request_type.model_construct(**spec.limits)  # a limit is a size a request may take
    problems += [lines.problem(("limits", problem.field), problem.message)
                 for problem in family.request_problems(task, configs, at_limits) if problem.field in spec.limits]
    return problems


def _unproducible_outputs(checked: CheckedGraph, configs: dict[str, dict[str, Any]], sizing: RequestParams) -> list[str]:
    """Why a stage's declared output has no shape at ``sizing`` with these configs, one line per output."""
    task = checked.loaded.spec.model.task
    try:
        symbols = checked.family.shape_symbols(task, configs, sizing)
    except KeyError as exc:
        return [f"a component config lacks {exc}, needed for the tensor shapes"]
    except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:  # a config of another model
        return [f"its component configs do not give the tensor shapes ({type(exc).__name__}: {exc}); "
                f"is model.path a {checked.family.name} model?"]
    found = []
    for stage in checked.stages.values():
        for tensor in stage.outputs:
            try:
                shape = evaluate_shape(tensor.shape, symbols)
            except ShapeExpressionError as exc:
                found.append(f"stage {stage.name!r} output {tensor.name!r}: {exc}")
                continue
            if 0 in shape:
                declared = ", ".join(map(str, tensor.shape))
                found.append(f"stage {stage.name!r} output {tensor.name!r} would be empty: shape {list(shape)} "
                             f"for [{declared}] at the largest request")
    return found
