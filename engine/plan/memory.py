"""Memory per node and fit per device: parameter bytes from the model configs on the meta device.

Weights are counted exactly (no checkpoint is read); activation memory is not estimated, so a device
that fits "with 2% to spare" may still run out at large resolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from engine.errors import PlanError
from engine.models.meta import parameter_bytes, parameter_count
from engine.plan.host import local_capacity
from engine.plan.model import Plan
from engine.stages import DTYPE_BYTES, ModelFamily


@dataclass(frozen=True)
class NodeMemory:
    node: str
    host: str
    device: str
    replicas: int  #: the most it may run at once (an elastic node's max): what must fit
    dtype: str
    parameters: dict[str, int]  #: component -> parameter count
    weights: dict[str, int]  #: component -> resident bytes (parameters and buffers, in the dtypes they load in)
    receive_bytes: int  #: edge receive slots one replica registers
    devices: tuple[str, ...] = ()  #: a several-device replica's devices, rank by rank: each holds the weights

    @property
    def ranks(self) -> int:
        return max(1, len(self.devices))

    @property
    def weight_bytes(self) -> int:
        """Parameter bytes one replica holds."""
        return sum(self.weights.values())

    @property
    def nominal_bytes(self) -> int:
        """Parameter bytes if every component ran in the node's dtype (what model cards quote)."""
        return sum(self.parameters.values()) * DTYPE_BYTES[self.dtype]

    @property
    def kept_float32(self) -> tuple[str, ...]:
        """Components that stay in float32 whatever the node's dtype (as the reference pipelines run them)."""
        return tuple(c for c, n in self.parameters.items() if n and self.weights[c] >= n * 4 and self.dtype != "float32")

    @property
    def total_bytes(self) -> int:
        """Every replica's weights on each of its ranks, and rank 0's receive slots."""
        return self.replicas * (self.ranks * self.weight_bytes + self.receive_bytes)

    @property
    def rank_bytes(self) -> tuple[int, ...]:
        """What the node's replicas hold on each rank's device."""
        return tuple(self.bytes_on(rank) for rank in range(self.ranks))

    def bytes_on(self, rank: int) -> int:
        """What the node's replicas hold on the device of ``rank``: the weights, and on rank 0 the receive slots."""
        return self.replicas * (self.weight_bytes + (self.receive_bytes if rank == 0 else 0))


@dataclass(frozen=True)
class DeviceFit:
    host: str
    device: str
    capacity: int | None  #: None: not declared and not detectable from here
    required: int
    nodes: tuple[str, ...]

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.required <= self.capacity


@dataclass(frozen=True)
class MemoryReport:
    nodes: tuple[NodeMemory, ...]
    devices: tuple[DeviceFit, ...]

    def raise_if_over(self) -> None:
        over = [d for d in self.devices if d.fits is False]
        if over:
            lines = [f"{d.host} {d.device}: nodes {', '.join(d.nodes)} need {gib(d.required)}, the device has {gib(d.capacity or 0)}" for d in over]
            raise PlanError("the graph does not fit in memory:\n  " + "\n  ".join(lines)
                            + "\nmove a node to another device, lower replicas, or use a smaller dtype (bf16)")


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


@cache
def _count(source: str, family: ModelFamily, task: str, component: str) -> int:
    return parameter_count(Path(source), family.components(task)[component])


@cache
def _bytes(source: str, family: ModelFamily, task: str, component: str, dtype: str) -> int:
    return parameter_bytes(Path(source), family.components(task)[component], dtype)


def memory_report(plan: Plan, family: ModelFamily, source: Path) -> MemoryReport:
    nodes = []
    for node in plan.nodes.values():
        parameters = {c: _count(str(source), family, plan.task, c) for c in node.components}
        weights = {c: _bytes(str(source), family, plan.task, c, node.dtype) for c in node.components}
        receive = sum(e.slots * e.slot_bytes for e in plan.edges_into(node.name))
        nodes.append(NodeMemory(node.name, node.host, node.device, node.most_replicas, node.dtype, parameters, weights,
                                receive, devices=node.devices if node.ranks > 1 else ()))
    devices: dict[tuple[str, str], list[tuple[NodeMemory, int]]] = {}
    for memory in nodes:
        for rank, device in enumerate(memory.devices or (memory.device,)):
            devices.setdefault((memory.host, device), []).append((memory, rank))
    fits = []
    for (host, device), ranks in devices.items():
        members = list({m.node: m for m, _ in ranks}.values())
        declared = [plan.nodes[m.node].memory_bytes for m in members if plan.nodes[m.node].memory_bytes is not None]
        if len(set(declared)) > 1:
            raise PlanError(f"{host} {device}: nodes {', '.join(m.node for m in members)} declare different place.memory")
        if declared:
            capacity: int | None = declared[0]
        else:  # detected on this host; another host's devices are not visible from here
            capacity = local_capacity(device) if host == "local" else None
        fits.append(DeviceFit(host, device, capacity, sum(m.bytes_on(rank) for m, rank in ranks), tuple(m.node for m in members)))
    return MemoryReport(tuple(nodes), tuple(fits))
