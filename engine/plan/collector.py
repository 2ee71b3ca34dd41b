"""Outputs made on another host come back over the data plane.

When the node that makes a graph's final outputs (the decoder) runs on an agent, the plan gains a ``collector``
node on the controller's host: one more replica with no stage and no weights, receiving the final tensors over
a Mooncake edge from that node, verified like every edge, and writing them where the run writes (the user finds
them where they ran ``engine run``). The output files are then made from the same tensors they would have been
made from on the other host, so they are identical.
"""

from __future__ import annotations

import dataclasses

from engine.errors import PlanError
from engine.plan.model import Plan, PlannedEdge, PlannedNode, PlannedTensor, Segment

COLLECTOR = "collector"
EDGE = "outputs"


def collect_remote_outputs(plan: Plan, finals: tuple[PlannedTensor, ...]) -> Plan:
    """``plan`` with a collector for final outputs made off the controller's host; unchanged when they are made
    on it. ``finals``: the final output tensors as planned (the largest request's shapes)."""
    writers = list(dict.fromkeys(s.node for s in plan.segments if set(s.outputs) & set(plan.final_outputs)))
    remote = [node for node in writers if plan.nodes[node].host != "local"]
    if not remote:
        return plan
    if len(writers) > 1:
        raise PlanError(f"the final outputs are made on several nodes ({', '.join(writers)}) and not all on this host: "
                        "place them with place.host: local")
    taken = [name for name in (COLLECTOR,) if name in plan.nodes] + [e.name for e in plan.edges if e.name == EDGE]
    if taken:
        raise PlanError(f"{taken[0]!r} is the name of the node and edge that bring outputs back from another host: "
                        "rename the graph's own")
    (writer,) = remote
    collector = PlannedNode(name=COLLECTOR, stages=(), components=(), host="local", device="cpu", replicas=1,
                            dtype=plan.nodes[writer].dtype, memory_bytes=None, rdma_device=None, line=None)
    edge = PlannedEdge(name=EDGE, source=writer, target=COLLECTOR, transport="mooncake", protocol=None,
                       integrity="xxh3-128", retries=3, slots=max((e.slots for e in plan.edges), default=2),
                       tensors=finals, line=None)
    names = tuple(t.name for t in finals)
    segment = Segment(index=len(plan.segments), node=COLLECTOR, stages=(), inputs=names, outputs=names)
    return dataclasses.replace(plan, nodes={**plan.nodes, COLLECTOR: collector}, edges=(*plan.edges, edge),
                               segments=(*plan.segments, segment))
