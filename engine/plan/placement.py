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
from engine.plan.memory import DeviceFit, NodeMemory
from engine.plan.model import Plan

ANY = "any"


@dataclasses.dataclass(frozen=True)
class Offer:
    """A device a live agent offers, with the memory free on it."""

    agent: str
    device: str
    free_bytes: int


def place_on_agents(plan: Plan, needs: Mapping[str, Sequence[int]], offers: Sequence[Offer]) -> Plan:
    """The plan with every ``any`` node on an agent device (host and device set); others unchanged. ``needs``: each
    node's bytes on the device of each of its ranks; a several-device node goes to one agent, on distinct GPUs (CPU
    ranks share the agent's cpu)."""
    free = {(offer.agent, offer.device): offer.free_bytes for offer in offers}
    nodes = dict(plan.nodes)
    for node in sorted((n for n in plan.nodes.values() if n.host == ANY), key=lambda n: -sum(needs[n.name])):
        kind = node.device.partition(":")[0]
        spots = _fitting(free, kind, needs[node.name])
        if spots is None:
            offers = ", ".join(f"{agent} {device} {human_bytes(room)}" for (agent, device), room in sorted(free.items())
                               if device.partition(":")[0] == kind) or f"no agent offers a {kind} device"
            ranks = f" on each of {len(needs[node.name])} {kind} devices of one agent" if len(needs[node.name]) > 1 else ""
            raise PlanError(f"node {node.name!r} (place.host: any) needs {human_bytes(max(needs[node.name]))} on {kind}"
                            f"{ranks}; no agent has that free ({offers})")
        for spot, need in zip(spots, needs[node.name]):
            free[spot] -= need
        devices = tuple(device for _, device in spots)
        nodes[node.name] = dataclasses.replace(node, host=spots[0][0], device=devices[0],
                                               devices=devices if node.ranks > 1 else node.devices)
    return dataclasses.replace(plan, nodes=nodes)


def deploy_needs(plan: Plan, nodes: Sequence[NodeMemory]) -> dict[str, tuple[int, ...]]:
    """What each node needs on each rank's device where it is placed at deploy: the bytes of the replicas it starts
    with (an elastic node's later ones are placed as they start, :mod:`engine.controller.placing`)."""
    return {m.node: tuple(nbytes // m.replicas * plan.nodes[m.node].replicas for nbytes in m.rank_bytes) for m in nodes}


def _fitting(free: Mapping[tuple[str, str], int], kind: str, needs: Sequence[int]) -> list[tuple[str, str]] | None:
    """The roomiest agent devices of ``kind`` for each rank's need, all on one agent; None where no agent has room."""
    best: tuple[int, list[tuple[str, str]]] | None = None
    for agent in sorted({agent for agent, _ in free}):
        devices = sorted(((room, device) for (a, device), room in free.items()
                          if a == agent and device.partition(":")[0] == kind), reverse=True)
        if kind == "cpu" and devices:  # CPU ranks share the one cpu device
            room, device = devices[0]
            if room >= sum(needs):
                candidate = (room - sum(needs), [(agent, device)] * len(needs))
                best = candidate if best is None or candidate[0] > best[0] else best
            continue
        if len(devices) < len(needs):
            continue
        chosen = devices[:len(needs)]
        if all(room >= need for (room, _), need in zip(chosen, sorted(needs, reverse=True))):
            order = sorted(range(len(needs)), key=lambda i: -needs[i])  # the largest need on the roomiest device
            spots: list[tuple[str, str]] = [("", "")] * len(needs)
            for (room, device), i in zip(chosen, order):
                spots[i] = (agent, device)
            slack = min(room - needs[i] for (room, _), i in zip(chosen, order))
            best = (slack, spots) if best is None or slack > best[0] else best
    return None if best is None else best[1]


def fit_on_agents(devices: Sequence[DeviceFit], offers: Sequence[Offer]) -> list[DeviceFit]:
    """The fit of each agent device against the memory its agent offers now (devices of agents not heard keep
    an unknown capacity: the caller says they are not live)."""
    free = {(offer.agent, offer.device): offer.free_bytes for offer in offers}
    return [dataclasses.replace(d, capacity=free[(d.host, d.device)]) if (d.host, d.device) in free else d for d in devices]
