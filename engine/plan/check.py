"""Static checks of a schema-valid graph against its model family, before anything is loaded.

Collects every problem (stages, nodes, edges, stage order, requests) and raises them together, each with
the file, line and field and what would be valid. Produces the static skeleton of the plan: which node
runs which stage, which tensors cross which edge, and the order of segments a request walks through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import networkx as nx
from pydantic import TypeAdapter, ValidationError

from engine.errors import EngineError, Problem, SpecError
from engine.families import family_names, get_family
from engine.plan.model import Segment
from engine.plan.parallel import check_parallel
from engine.spec.load import LoadedGraph, did_you_mean, problems_from_validation
from engine.stages import ModelFamily, RequestParams, StageSpec, TensorSpec


@dataclass(frozen=True)
class Flow:
    """One tensor going from the node that produces it to a node that reads it."""

    tensor: TensorSpec
    producer: str  # stage
    consumers: tuple[str, ...]  # stages
    source: str  # node
    target: str  # node


@dataclass(frozen=True)
class CheckedGraph:
    loaded: LoadedGraph
    family: ModelFamily
    stages: dict[str, StageSpec]  # family order
    node_of: dict[str, str]  # stage -> node
    flows: tuple[Flow, ...]
    segments: tuple[Segment, ...]
    final_outputs: tuple[str, ...]
    transports: dict[str, str]  # edge name -> resolved transport
    request_defaults: dict[str, Any]
    requests: tuple[RequestParams, ...]


def check_graph(loaded: LoadedGraph) -> CheckedGraph:
    """Every static check; raises SpecError with all problems found."""
    spec, lines = loaded.spec, loaded.lines
    problems: list[Problem] = []

    family = _family(loaded, problems)
    if family is None:
        raise SpecError(problems)
    stages = {s.name: s for s in family.stages(spec.model.task)}

    node_of = _placement(loaded, stages, problems)
    produced = {t.name: (s.name, t) for s in stages.values() for t in s.outputs}
    flows = _flows(stages, node_of, produced)
    _check_stage_order(loaded, stages, node_of, produced, problems)
    transports = _check_edges(loaded, flows, problems)
    _check_devices(loaded, problems)
    check_parallel(loaded, family, stages, problems)
    _check_step_cache(loaded, stages, problems)
    _check_backends(loaded, family, stages, problems)
    segments, final_outputs = _segments(stages, node_of, produced, flows, loaded, problems)
    defaults, requests = _requests(loaded, family, problems)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))  # a problem found twice is reported once
    return CheckedGraph(loaded, family, stages, node_of, tuple(flows), segments, final_outputs, transports, defaults, requests)


def _family(loaded: LoadedGraph, problems: list[Problem]) -> ModelFamily | None:
    model, lines = loaded.spec.model, loaded.lines
    try:
        family = get_family(model.family)
    except EngineError:
        names = family_names()
        problems.append(lines.problem(("model", "family"), f"unknown family {model.family!r}{did_you_mean(model.family, names)} (installed: {', '.join(names)})"))
        return None
    if model.task not in family.tasks:
        problems.append(lines.problem(("model", "task"), f"{model.family} has no task {model.task!r}{did_you_mean(model.task, family.tasks)} (tasks: {', '.join(family.tasks)})"))
        return None
    return family


def _placement(loaded: LoadedGraph, stages: dict[str, StageSpec], problems: list[Problem]) -> dict[str, str]:
    lines, task = loaded.lines, loaded.spec.model.task
    node_of: dict[str, str] = {}
    for node_name, node in loaded.spec.nodes.items():
        for i, stage in enumerate(node.stages):
            where = ("nodes", node_name, "stages", i)
            if stage not in stages:
                problems.append(lines.problem(where, f"{loaded.spec.model.family} {task} has no stage {stage!r}{did_you_mean(stage, stages)} (stages: {', '.join(stages)})"))
            elif stage in node_of:
                other = node_of[stage]
                problems.append(lines.problem(where, f"stage {stage!r} is placed twice ({'also earlier in this node' if other == node_name else f'also in node {other!r}'}); place each stage exactly once"))
            else:
                node_of[stage] = node_name
    missing = [s for s in stages if s not in node_of]
    if missing:
        problems.append(lines.problem(("nodes",), f"stage{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} of {task} {'are' if len(missing) > 1 else 'is'} not placed on any node; every stage runs on exactly one node"))
    return node_of


def _flows(stages: dict[str, StageSpec], node_of: dict[str, str], produced: dict[str, tuple[str, TensorSpec]]) -> list[Flow]:
    flows: dict[tuple[str, str], list[str]] = {}
    for stage in stages.values():
        for name in stage.inputs:
            producer, _ = produced[name]
            if stage.name in node_of and producer in node_of and node_of[stage.name] != node_of[producer]:
                flows.setdefault((name, node_of[stage.name]), []).append(stage.name)
    return [Flow(produced[name][1], produced[name][0], tuple(consumers), node_of[produced[name][0]], target)
            for (name, target), consumers in flows.items()]


def _check_stage_order(loaded: LoadedGraph, stages: dict[str, StageSpec], node_of: dict[str, str],
                       produced: dict[str, tuple[str, TensorSpec]], problems: list[Problem]) -> None:
    """A node runs its stages in the order listed: that order must not contradict the data flow."""
    graph = nx.DiGraph()
    for stage in stages.values():
        for name in stage.inputs:
            graph.add_edge(produced[name][0], stage.name, why=f"{stage.name!r} reads {name!r}")
    for node_name, node in loaded.spec.nodes.items():
        # each stage once, where it was first listed (a repeat is reported by _placement, not as a cycle)
        placed = list(dict.fromkeys(s for s in node.stages if node_of.get(s) == node_name))
        for before, after in zip(placed, placed[1:]):
            graph.add_edge(before, after, why=f"node {node_name!r} lists {before!r} before {after!r}")
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    reasons = "; ".join(graph.edges[a, b]["why"] for a, b in cycle)
    node_name = next((node_of[a] for a, b in cycle if node_of.get(a) == node_of.get(b)), None)
    path = ("nodes", node_name, "stages") if node_name else ("nodes",)
    problems.append(loaded.lines.problem(path, f"stage order contradicts the data flow (a cycle: {reasons}); list a node's stages in data-flow order"))


def _check_edges(loaded: LoadedGraph, flows: list[Flow], problems: list[Problem]) -> dict[str, str]:
    spec, lines = loaded.spec, loaded.lines
    needed: dict[tuple[str, str], list[str]] = {}
    for flow in flows:
        needed.setdefault((flow.source, flow.target), []).append(flow.tensor.name)
    declared: dict[tuple[str, str], int] = {}
    names: dict[str, int] = {}
    transports: dict[str, str] = {}
    for i, edge in enumerate(spec.edges):
        at = ("edges", i)
        if edge.name in names:
            problems.append(lines.problem((*at, "name"), f"edge name {edge.name!r} is used twice (also edges[{names[edge.name]}])"))
        names.setdefault(edge.name, i)
        ends_ok = True
        for key, node in (("from", edge.source), ("to", edge.target)):
            if node not in spec.nodes:
                problems.append(lines.problem((*at, key), f"no node {node!r}{did_you_mean(node, spec.nodes)} (nodes: {', '.join(spec.nodes)})"))
                ends_ok = False
        if not ends_ok:
            continue
        pair = (edge.source, edge.target)
        if edge.source == edge.target:
            problems.append(lines.problem((*at, "to"), f"an edge joins two different nodes; stages within node {edge.source!r} share tensors directly"))
            continue
        if pair in declared:
            problems.append(lines.problem(at, f"a second edge from {edge.source!r} to {edge.target!r} (also edges[{declared[pair]}]); one edge carries all tensors between two nodes"))
            continue
        declared[pair] = i
        if pair not in needed:
            problems.append(lines.problem(at, f"edge {edge.name!r} carries nothing: no stage on {edge.target!r} reads a tensor produced on {edge.source!r}; remove it"))
        source_host = spec.nodes[edge.source].place.host
        same_host = source_host == spec.nodes[edge.target].place.host and source_host != "any"  # any: placed apart
        if edge.protocol is not None and edge.transport == "shm":
            problems.append(lines.problem((*at, "protocol"), f"protocol {edge.protocol} applies to mooncake edges; this edge uses shm (drop protocol, or use transport mooncake)"))
        if edge.transport == "shm" and not same_host:
            problems.append(lines.problem((*at, "transport"), f"shm needs both nodes on one host; {edge.source!r} is on {source_host!r}, {edge.target!r} on {spec.nodes[edge.target].place.host!r}: use mooncake (or auto)"))
        auto = "shm" if same_host and edge.protocol is None else "mooncake"  # a protocol asks for Mooncake
        transports[edge.name] = edge.transport if edge.transport != "auto" else auto
    for (source, target), tensors in needed.items():
        if (source, target) not in declared:
            problems.append(lines.problem(("edges",), f"missing edge from {source!r} to {target!r}: node {target!r} reads {', '.join(tensors)} produced on {source!r}; add `- {{name: ..., from: {source}, to: {target}}}`"))
    return transports


def _check_devices(loaded: LoadedGraph, problems: list[Problem]) -> None:
    """Nodes sharing one device plan against one memory size: they may not declare different ones."""
    first: dict[tuple[str, str], tuple[str, str]] = {}
    for name, node in loaded.spec.nodes.items():
        place = node.place
        if place.memory is None:
            continue
        key = (place.host, place.device)
        other = first.setdefault(key, (name, place.memory))
        if place.memory_bytes != loaded.spec.nodes[other[0]].place.memory_bytes:
            problems.append(loaded.lines.problem(("nodes", name, "place", "memory"), f"{place.memory} differs from node {other[0]!r} on the same device ({place.host} {place.device}: {other[1]}); nodes sharing a device declare one memory size"))


def _check_step_cache(loaded: LoadedGraph, stages: dict[str, StageSpec], problems: list[Problem]) -> None:
    """``cache:`` and ``preview:`` only on a node whose stages call a DiT step by step (a denoising loop)."""
    for name, node in loaded.spec.nodes.items():
        looping = any(stages[s].step_cached for s in node.stages if s in stages)
        for field in ("cache", "preview"):
            if getattr(node, field) is not None and not looping:
                cached = [s.name for s in stages.values() if s.step_cached]
                problems.append(loaded.lines.problem(("nodes", name, field), f"node {name!r} runs no DiT loop to {field} "
                                                     f"(stages that do: {', '.join(cached)}); put {field} on the node running them"))


def _check_backends(loaded: LoadedGraph, family: ModelFamily, stages: dict[str, StageSpec], problems: list[Problem]) -> None:
    """Each node's ``backend`` chains: stages of that node, backends that can serve the stage, nothing after eager."""
    from engine.backends.names import GRAPH_BACKENDS

    components = family.components(loaded.spec.model.task)
    for node_name, node in loaded.spec.nodes.items():
        for stage, chain in node.backend.items():
            where = ("nodes", node_name, "backend", stage)
            if stage not in node.stages:
                problems.append(loaded.lines.problem(where, f"node {node_name!r} does not run stage {stage!r}{did_you_mean(stage, node.stages)} (its stages: {', '.join(node.stages)})"))
                continue
            if stage not in stages:
                continue  # reported by _placement
            for i, backend in enumerate(chain):
                at = (*where, i)
                if backend in chain[:i]:
                    problems.append(loaded.lines.problem(at, f"{backend} is listed twice; list each backend once"))
                elif backend in GRAPH_BACKENDS and not stages[stage].exportable:
                    problems.append(loaded.lines.problem(at, f"{backend} cannot serve {stage!r}: {loaded.spec.model.family} exports no graph of it (stages it exports: {', '.join(s.name for s in stages.values() if s.exportable) or 'none'}); use compile or eager"))
                elif backend == "compile" and not any(components[c].weights for c in stages[stage].components if c in components):
                    problems.append(loaded.lines.problem(at, f"compile cannot serve {stage!r}: the stage holds no module to compile; use eager"))
            if "eager" in chain[:-1]:
                problems.append(loaded.lines.problem(where, f"eager never fails, so {', '.join(chain[chain.index('eager') + 1:])} after it would never run; put eager last"))


def _segments(stages: dict[str, StageSpec], node_of: dict[str, str], produced: dict[str, tuple[str, TensorSpec]],
              flows: list[Flow], loaded: LoadedGraph, problems: list[Problem]) -> tuple[tuple[Segment, ...], tuple[str, ...]]:
    """Group the family's stage order into runs of consecutive stages on one node."""
    consumed = {name for s in stages.values() for name in s.inputs}
    final_outputs = tuple(t.name for s in stages.values() for t in s.outputs if t.name not in consumed)
    if len(node_of) != len(stages):
        return (), final_outputs
    groups: list[list[str]] = []
    for stage in stages:
        if groups and node_of[groups[-1][0]] == node_of[stage]:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    segment_of = {stage: i for i, group in enumerate(groups) for stage in group}
    crossing = {f.tensor.name for f in flows}
    segments = []
    for i, group in enumerate(groups):
        node = node_of[group[0]]
        inputs = tuple(dict.fromkeys(n for s in group for n in stages[s].inputs if node_of[produced[n][0]] != node))
        for s in group:
            for n in stages[s].inputs:
                producer = produced[n][0]
                if node_of[producer] == node and segment_of[producer] != i:
                    problems.append(loaded.lines.problem(("nodes", node, "stages"), f"stage {s!r} reads {n!r} from {producer!r} on the same node, but a request leaves node {node!r} between them; place them so that they run back to back"))
        outputs = tuple(t.name for s in group for t in stages[s].outputs if t.name in crossing or t.name in final_outputs)
        segments.append(Segment(i, node, tuple(group), inputs, outputs))
    return tuple(segments), final_outputs


def _requests(loaded: LoadedGraph, family: ModelFamily, problems: list[Problem]) -> tuple[dict[str, Any], tuple[RequestParams, ...]]:
    spec, lines = loaded.spec, loaded.lines
    request_type = family.request_type(spec.model.task)
    fields = list(request_type.model_fields)
    for key in spec.request:
        if key not in fields:
            problems.append(lines.problem(("request", key), f"unknown request parameter{did_you_mean(key, fields)} (valid: {', '.join(fields)})"))
    for key in spec.limits:
        if key not in request_type.size_fields:
            problems.append(lines.problem(("limits", key), f"not a size parameter{did_you_mean(key, request_type.size_fields)} (valid: {', '.join(request_type.size_fields)})"))
    _check_limits(loaded, request_type, problems)
    requests = []
    for i, overrides in enumerate(spec.requests):
        request = validate_request(request_type, spec.request, overrides, loaded, ("requests", i), problems)
        if request is not None:
            for name in request_type.size_fields:
                limit = spec.limits.get(name)
                # a default over the limit is reported once, at the default's line (_check_limits)
                if limit is not None and getattr(request, name) > limit and (name in overrides or name not in spec.request):
                    problems.append(lines.problem(("requests", i, name), f"{getattr(request, name)} exceeds limits.{name} = {limit}"))
            requests.append(request)
    if not spec.requests:  # defaults alone may lack a prompt; check what they do give
        defaults_problems: list[Problem] = []
        validate_request(request_type, spec.request, {}, loaded, ("request",), defaults_problems)
        problems.extend(p for p in defaults_problems if "required but missing" not in p.message)
    return dict(spec.request), tuple(requests)


def _check_limits(loaded: LoadedGraph, request_type: type[RequestParams], problems: list[Problem]) -> None:
    """Each limit is a value the request could take (it sizes buffers), and the defaults stay within it."""
    spec, lines = loaded.spec, loaded.lines
    for name, limit in spec.limits.items():
        if name not in request_type.size_fields:
            continue
        field = request_type.model_fields[name]
        try:
            TypeAdapter(Annotated[field.annotation, field]).validate_python(limit)
        except ValidationError as exc:
            problems.extend(problems_from_validation(exc, lines, ("limits", name)))
            continue
        default = spec.request.get(name, field.default)
        if isinstance(default, int) and default > limit:
            if name in spec.request:
                problems.append(lines.problem(("request", name), f"{default} exceeds limits.{name} = {limit}"))
            else:
                problems.append(lines.problem(("limits", name), f"{limit} is below the model's default {name} ({default}), which a request without {name} would use; set request.{name} as well"))


def validate_request(request_type: type[RequestParams], defaults: dict[str, Any], values: dict[str, Any],
                     loaded: LoadedGraph, at: tuple[Any, ...], problems: list[Problem]) -> RequestParams | None:
    """Merge ``values`` over ``defaults`` and validate; problems point at whichever line gave the value.

    Unknown keys among the ``defaults`` are not reported here: the graph's defaults are checked once, on
    their own, rather than again for every request that inherits them.
    """
    merged = {**defaults, **values}
    fields = list(request_type.model_fields)

    def where(key: Any) -> tuple[Any, ...]:
        return ("request", key) if key is not None and key not in values and key in defaults else (*at, key)

    try:
        request = request_type.model_validate(merged)
    except ValidationError as exc:
        for problem, error in zip(problems_from_validation(exc, loaded.lines, at), exc.errors()):
            key = error["loc"][0] if error["loc"] else None
            if error["type"] == "extra_forbidden":
                if where(key)[0] == "request":
                    continue
                problem = loaded.lines.problem(where(key), f"unknown request parameter{did_you_mean(str(key), fields)} (valid: {', '.join(fields)})")
            elif key is not None:
                problem = loaded.lines.problem(where(key), problem.message)
            problems.append(problem)
        return None
    # Files (an input image) must exist; relative paths resolve against the graph file's folder.
    files = {name: value for name, value in request if isinstance(value, Path)}
    for name, value in files.items():
        resolved = value if value.is_absolute() else loaded.base_dir / value
        if not resolved.is_file():
            problems.append(loaded.lines.problem(where(name), f"no such file: {resolved}"))
            return None
    try:
        return request.resolve_paths(loaded.base_dir)
    except ValidationError as exc:  # the family checks the file itself (an unreadable image)
        for error in exc.errors():
            loc = error["loc"] or (tuple(files)[:1] if len(files) == 1 else ())
            problems.append(loaded.lines.problem(where(loc[0]) if loc else at, error["msg"].removeprefix("Value error, ")))
        return None
