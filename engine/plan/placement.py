"""``place.host: any``: the planner puts such a node on a live agent that has room for it.

Given what each node needs (weights and receive buffers of all its replicas, from the memory report) and what
the agents offer (each device with its free memory, from their announcements), each ``any`` node goes, largest
first, to the agent device of the node's kind (cpu, cuda, xpu) with the most room left after the nodes already
placed there. A node that fits nowhere is a PlanError naming the node, what it needs and what each agent offers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from engine.display import human_bytes
from engine.errors import PlanError
from engine.plan.memory import DeviceFit
from engine.plan.model import Plan

ANY = "any"


@dataclasses.dataclass(frozen=True)
class Offer:
    """A device a live agent offers, with the memory free on it."""

    agent: str
    device: str
    free_bytes: int


def place_on_agents(plan: Plan, needs: Mapping[str, int], offers: Sequence[Offer]) -> Plan:
    """The plan with every ``any`` node on an agent device (host and device set); others unchanged."""
    free = {(offer.agent, offer.device): offer.free_bytes for offer in offers}
    nodes = dict(plan.nodes)
    for node in sorted((n for n in plan.nodes.values() if n.host == ANY), key=lambda n: -needs[n.name]):
        kind = node.device.partition(":")[0]
        fitting = [(room, spot) for spot, room in free.items()
                   if spot[1].partition(":")[0] == kind and room >= needs[node.name]]
        if not fitting:
            offers = ", ".join(f"{agent} {device} {human_bytes(room)}" for (agent, device), room in sorted(free.items())
                               if device.partition(":")[0] == kind) or f"no agent offers a {kind} device"
            raise PlanError(f"node {node.name!r} (place.host: any) needs {human_bytes(needs[node.name])} on {kind}; no "
                            f"agent has that free ({offers})")
        room, (agent, device) = max(fitting)
        free[(agent, device)] = room - needs[node.name]
        nodes[node.name] = dataclasses.replace(node, host=agent, device=device)
    return dataclasses.replace(plan, nodes=nodes)


def fit_on_agents(devices: Sequence[DeviceFit], offers: Sequence[Offer]) -> list[DeviceFit]:
    """The fit of each agent device against the memory its agent offers now (devices of agents not heard keep
    an unknown capacity: the caller says they are not live)."""
    free = {(offer.agent, offer.device): offer.free_bytes for offer in offers}
    return [dataclasses.replace(d, capacity=free[(d.host, d.device)]) if (d.host, d.device) in free else d for d in devices]
