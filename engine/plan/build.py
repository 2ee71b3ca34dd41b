"""From a checked graph to the plan: tensor shapes and edge buffer sizes at the largest admitted request, and which
limit, request or default gave each size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import PlanError
from engine.plan.check import CheckedGraph, check_graph
from engine.plan.collector import collect_remote_outputs
from engine.plan.feeder import feed_remote_inputs, largest_file
from engine.plan.host import check_local_devices
from engine.plan.model import Plan, PlannedEdge, PlannedNode, PlannedTensor
from engine.plan.model_check import check_model, check_requests, model_source
from engine.plan.shapes import evaluate_shape
from engine.spec.load import load_graph
from engine.spec.schema import Parallel, parse_memory
from engine.stages import DTYPE_BYTES, MODEL_DTYPE, Configs, ModelFamily, RequestParams, TensorSpec


#: Where a size field of the largest request comes from, as ``engine plan`` names it.
FROM_LIMITS, FROM_REQUESTS, FROM_DEFAULTS, FROM_FAMILY = "limits", "requests", "request defaults", "family default"


@dataclass(frozen=True)
class Sizing:
    """The largest request the edges must hold, and where each of its size fields comes from."""

    request: RequestParams
    sources: dict[str, str]  #: size field -> FROM_LIMITS, FROM_REQUESTS, FROM_DEFAULTS or FROM_FAMILY


def sizing(checked: CheckedGraph, requests: Sequence[RequestParams] = ()) -> Sizing:
    """The largest request the edges must hold: each size parameter at its explicit limit; else at the largest
    value the graph's requests and ``requests`` (those of a run) use; else, with no request at all (a service),
    at the graph's request default; the family's default only when the graph gives none.

    Explicit limits are a ceiling the graph sets (requests above them are refused); without one, the
    buffers fit exactly the largest request the graph or the run declares.
    """
    spec = checked.loaded.spec
    request_type = checked.family.request_type(spec.model.task)
    given = (*checked.requests, *requests)
    sizes: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in request_type.size_fields:
        if name in spec.limits:
            sizes[name], sources[name] = spec.limits[name], FROM_LIMITS
        elif given:
            sizes[name], sources[name] = max(getattr(r, name) for r in given), FROM_REQUESTS
        elif name in checked.request_defaults:
            sizes[name], sources[name] = checked.request_defaults[name], FROM_DEFAULTS
        else:
            sizes[name], sources[name] = request_type.model_fields[name].default, FROM_FAMILY
    return Sizing(request_type.model_construct(**sizes), sources)


def sizing_request(checked: CheckedGraph, requests: Sequence[RequestParams] = ()) -> RequestParams:
    """The largest request the edges must hold (:func:`sizing`)."""
    return sizing(checked, requests).request


def sized_by(family: ModelFamily, task: str, configs: Configs, largest: RequestParams,
             tensor: TensorSpec) -> tuple[str, ...]:
    """The size fields ``tensor``'s shape depends on: those whose growth changes its shape at ``largest``."""
    shape = evaluate_shape(tensor.shape, family.shape_symbols(task, configs, largest))
    fields = []
    for name in type(largest).size_fields:
        grown = largest.model_copy(update={name: 2 * getattr(largest, name) + 64})  # past any one token's step
        if evaluate_shape(tensor.shape, family.shape_symbols(task, configs, grown)) != shape:
            fields.append(name)
    return tuple(fields)


def node_dtype(checked: CheckedGraph, node: str) -> str:
    return checked.loaded.spec.nodes[node].dtype or checked.loaded.spec.model.dtype


def build_plan(checked: CheckedGraph, source: Path, requests: Sequence[RequestParams] = (), *,
               input_file_bytes: int | None = None) -> Plan:
    """Resolve shapes against the model at ``source`` and size every edge (for ``requests`` as well); input files
    reach nodes on other hosts (engine.plan.feeder) and final outputs made there come back to this one
    (engine.plan.collector). ``input_file_bytes``: the largest input file to carry (a service's upload limit);
    by default the largest the graph's requests and ``requests`` name."""
    spec, lines = checked.loaded.spec, checked.loaded.lines
    task = spec.model.task
    largest = sizing(checked, requests)
    configs = check_model(checked, source, largest.request)
    check_requests(checked, configs, requests)
    symbols = checked.family.shape_symbols(task, configs, largest.request)
    components = checked.family.components(task)

    nodes = {}
    for name, node in spec.nodes.items():
        needed = dict.fromkeys(c for stage in node.stages for c in checked.stages[stage].components)
        missing = [c for c in needed if c not in components]
        if missing:
            raise PlanError(f"node {name!r}: the {spec.model.family} family declares no component {missing}")
        fewest, most = node.replica_bounds
        nodes[name] = PlannedNode(
            name=name, stages=tuple(node.stages), components=tuple(needed), host=node.place.host,
            device=node.place.device, replicas=fewest, dtype=node_dtype(checked, name),
            memory_bytes=node.place.memory_bytes, rdma_device=node.place.rdma_device, line=lines.line(("nodes", name)),
            devices=node.place.all_devices, parallel=node.parallel or Parallel(),
            cache=node.cache, preview=node.preview,
            backends={stage: tuple(chain) for stage, chain in node.backend.items()}, strict=node.strict,
            max_replicas=most if most > fewest else None, threads=node.place.threads,
            output_cache_bytes=parse_memory(node.output_cache),
        )

    def planned(tensor: TensorSpec, node: str, producer: str, consumers: tuple[str, ...]) -> PlannedTensor:
        dtype = nodes[node].dtype if tensor.dtype == MODEL_DTYPE else tensor.dtype
        shape = evaluate_shape(tensor.shape, symbols)  # check_model evaluated every output already
        nbytes = DTYPE_BYTES[dtype]
        for dim in shape:
            nbytes *= dim
        return PlannedTensor(tensor.name, dtype, shape, nbytes, tensor.optional, tensor.variable, producer, consumers,
                             expression=tensor.shape,
                             sized_by=sized_by(checked.family, task, configs, largest.request, tensor))

    edges = []
    for i, edge in enumerate(spec.edges):
        tensors = [planned(flow.tensor, flow.source, flow.producer, flow.consumers) for flow in checked.flows
                   if (flow.source, flow.target) == (edge.source, edge.target)]
        edges.append(PlannedEdge(
            name=edge.name, source=edge.source, target=edge.target, transport=checked.transports[edge.name],
            protocol=edge.protocol, integrity=edge.integrity, retries=edge.retries, slots=edge.slots, tensors=tuple(tensors),
            line=lines.line(("edges", i)),
        ))

    finals = tuple(planned(tensor, checked.node_of[stage.name], stage.name, ()) for stage in checked.stages.values()
                   for tensor in stage.outputs if tensor.name in checked.final_outputs)
    plan = collect_remote_outputs(Plan(
        graph=spec.name, file=lines.file, family=spec.model.family, task=task, model_path=spec.model.path,
        dtype=spec.model.dtype, broker=spec.broker, nodes=nodes, edges=tuple(edges), segments=checked.segments,
        final_outputs=checked.final_outputs, request_defaults=checked.request_defaults, requests=checked.requests,
        limits={name: getattr(largest.request, name) for name in type(largest.request).size_fields},
        sized_from=largest.sources, timeouts=spec.timeouts,
        base_dir=str(checked.loaded.base_dir), component_folders={name: c.folder for name, c in components.items()},
        configs=configs, scaling=spec.scaling,
    ), finals)
    if input_file_bytes is None:
        input_file_bytes = largest_file((*checked.requests, *requests))
    return feed_remote_inputs(plan, checked.stages, input_file_bytes)


def plan_on_this_host(checked: CheckedGraph, requests: Sequence[RequestParams] = (), *,
                      input_file_bytes: int | None = None) -> tuple[Plan, Path]:
    """Plan a checked graph to run from this host, its edges sized for ``requests`` as well: the devices of
    local nodes are checked first, then the model source is resolved (and a preset built on first use)."""
    check_local_devices(checked)
    source = model_source(checked, build=True)
    return build_plan(checked, source, requests, input_file_bytes=input_file_bytes), source


def check_service_graph(path: str | Path, overrides: Sequence[str] = ()) -> CheckedGraph:
    """Load and check a graph to serve (``engine serve``, ``engine deploy``): a service's requests come from its
    clients, so the graph's own ``requests`` are dropped, and its edges are sized at the graph's limits, else its
    request defaults, else the family's (:func:`sizing`)."""
    return check_graph(load_graph(path, [*overrides, "requests=[]"]))


def plan_graph(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Plan, CheckedGraph, Path]:
    """Load, check and plan a graph file (``engine plan``, ``engine graph``)."""
    checked = check_graph(load_graph(path, overrides))
    plan, source = plan_on_this_host(checked)
    return plan, checked, source
