"""Input files reach a node on another host over the data plane.

A request names its input files (an input image) by their path on the controller's host, where no other host can
read them. When a node whose stages read one (``StageSpec.reads``) runs on an agent, the plan gains a ``feeder`` node
on the controller's host: one more replica with no stage and no weights, whose segment runs first and sends each
file's bytes over a Mooncake edge to that node, verified like every edge. The receiving worker writes them into its
run folder and runs its stages on that copy: the same bytes, so the same output as on one host. The mirror of
:mod:`engine.plan.collector`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from engine.errors import PlanError
from engine.plan.model import Plan, PlannedEdge, PlannedNode, PlannedTensor, Segment
from engine.stages import RequestParams, StageSpec

FEEDER = "feeder"
EDGE = "inputs"
_SUFFIX = "_file"
#: What sizes the feeder's edges, as ``engine plan`` names it.
INPUT_FILE = "largest input file"
#: The largest file carried when no request names one yet: a service's uploads are at most this (20 MiB).
DEFAULT_FILE_BYTES = 20 << 20


def file_tensor(field: str) -> str:
    """The name of the tensor that carries the file of request field ``field``."""
    return f"{field}{_SUFFIX}"


def file_field(tensor: str) -> str:
    """The request field whose file the tensor ``tensor`` (on an edge from the feeder) carries."""
    return tensor.removesuffix(_SUFFIX)


def largest_file(requests: Iterable[RequestParams]) -> int:
    """Bytes of the largest file the requests name; :data:`DEFAULT_FILE_BYTES` when they name none."""
    return max((getattr(r, name).stat().st_size for r in requests for name in r.file_fields()),
               default=DEFAULT_FILE_BYTES)


def feed_remote_inputs(plan: Plan, stages: Mapping[str, StageSpec], file_bytes: int) -> Plan:
    """``plan`` with a feeder for the input files of nodes off the controller's host; unchanged when every node
    that reads one runs on it. ``stages``: the task's stages by name; ``file_bytes``: the largest file to carry."""
    readers = {name: fields for name, node in plan.nodes.items() if node.host != "local"
               and (fields := tuple(dict.fromkeys(field for stage in node.stages for field in stages[stage].reads)))}
    if not readers:
        return plan
    edge_of = {node: EDGE if len(readers) == 1 else f"{EDGE}_{node}" for node in readers}
    names = {file_tensor(field) for fields in readers.values() for field in fields}
    taken = ([FEEDER] if FEEDER in plan.nodes else []) + [e.name for e in plan.edges if e.name in edge_of.values()] + \
        sorted(names & {t.name for e in plan.edges for t in e.tensors})
    if taken:
        raise PlanError(f"{taken[0]!r} is the name of a node, edge or tensor that brings input files to another host: "
                        "rename the graph's own")
    too_long = [name for name in edge_of.values() if len(name) > 64]
    if too_long:
        raise PlanError(f"node name too long for the edge that brings it the input files ({too_long[0]!r}): "
                        "shorten it to 57 characters")

    feeder = PlannedNode(name=FEEDER, stages=(), components=(), host="local", device="cpu", replicas=1, dtype=plan.dtype,
                         memory_bytes=None, rdma_device=None, line=None)
    slots = max((e.slots for e in plan.edges), default=2)
    edges = tuple(PlannedEdge(
        name=edge_of[node], source=FEEDER, target=node, transport="mooncake", protocol=None, integrity="xxh3-128",
        retries=3, slots=slots, line=None,
        tensors=tuple(PlannedTensor(
            file_tensor(field), "uint8", (file_bytes,), file_bytes, optional=False, variable=(0,), producer=FEEDER,
            consumers=tuple(s for s in plan.nodes[node].stages if field in stages[s].reads), expression=(file_bytes,),
            sized_by=(INPUT_FILE,),
        ) for field in fields),
    ) for node, fields in readers.items())

    # The feeder's segment runs first; each reader takes the files in the one segment of its stages that read them.
    segments = [Segment(index=0, node=FEEDER, stages=(), inputs=(), outputs=tuple(sorted(names)))]
    for segment in plan.segments:
        fed = tuple(file_tensor(field) for field in readers.get(segment.node, ())
                    if any(field in stages[s].reads for s in segment.stages))
        segments.append(dataclasses.replace(segment, index=segment.index + 1, inputs=(*segment.inputs, *fed)))
    for node, fields in readers.items():
        reading = [s.index for s in segments if s.node == node and set(s.inputs) & {file_tensor(f) for f in fields}]
        if len(reading) > 1:
            raise PlanError(f"node {node!r} reads the request's files in {len(reading)} separate runs of stages; on "
                            "another host it must read them in one: place the stages that read them next to each other")
    return dataclasses.replace(plan, nodes={FEEDER: feeder, **plan.nodes}, edges=(*plan.edges, *edges),
                               segments=tuple(segments))
