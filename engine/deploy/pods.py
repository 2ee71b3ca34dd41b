"""Which pod each node of a graph runs in on a cluster, on which device there, and what each pod requests.

The controller in the serving head reaches an agent by its name: a node with ``place.host: NAME`` runs on the
agent that announced itself as NAME (``place.host: any`` would pick among all agents by free memory, so a node
could land on another node's pod). So every node gets a Deployment of its own whose pod runs ``engine agent
--name <the Deployment's name>``, and the rendered graph places the node on that name. The controller puts every
replica of a node on that one agent: the node's replicas are worker processes in the one pod, sharing its device,
and the pod requests the memory of all of them. Nodes that write the run's outputs run in the serving head
(``place.host: local``): in this version outputs are written where the controller runs.

A container sees the accelerators it was given as ``cuda:0``, ``cuda:1``...: each pod's devices are renumbered
from 0, per kind, in the order of the graph's indices.

Memory requests are host memory: a node's receive slots always live there, and its weights pass through it while
loading (components are read on the CPU, then moved to the node's device), for every replica at once. So a pod
requests the weights and receive buffers of all its replicas (the plan's figures, as ``engine plan`` prints them)
plus ``headroom`` per process (each worker, and the agent or the serving head itself) for Python, torch, the
CUDA context and activations, which the plan does not estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.plan.check import CheckedGraph
from engine.plan.memory import MemoryReport
from engine.plan.model import Plan

HEAD = "head"  #: the serving head's Deployment
#: Kubernetes extended resource per accelerator kind (the NVIDIA and Intel device plugins).
ACCELERATOR_RESOURCES = {"cuda": "nvidia.com/gpu", "xpu": "gpu.intel.com/i915"}


@dataclass(frozen=True)
class Pod:
    """One Deployment's pod: the serving head, or an agent running one node."""

    name: str  #: the Deployment's name; for an agent also the agent's name, which the graph places the node on
    nodes: tuple[str, ...]
    devices: dict[str, str]  #: node -> its device inside the pod

    @property
    def is_head(self) -> bool:
        return self.name == HEAD

    @property
    def host(self) -> str:
        """What the rendered graph's ``place.host`` says for this pod's nodes."""
        return "local" if self.is_head else self.name


@dataclass(frozen=True)
class PodResources:
    memory_bytes: int  #: host memory to request
    accelerators: dict[str, int]  #: extended resource name -> count
    rdma: bool  #: an edge of one of its nodes says protocol: rdma
    processes: int  #: worker processes, plus the agent or the serving head


def agent_name(node: str) -> str:
    """A node's Deployment and agent name: a DNS label (node names are ``[a-z][a-z0-9_]*``), never 'local' or 'any'."""
    return "node-" + node.replace("_", "-")


def assign_pods(checked: CheckedGraph) -> tuple[Pod, ...]:
    """The serving head with the nodes that write outputs, then one agent pod per other node, in graph order."""
    spec = checked.loaded.spec
    writers = {s.node for s in checked.segments if set(s.outputs) & set(checked.final_outputs)}
    members = [[name for name in spec.nodes if name in writers]] + [[name] for name in spec.nodes if name not in writers]
    pods = []
    for nodes in members:
        devices = {node: spec.nodes[node].place.device for node in nodes}
        name = HEAD if nodes[0] in writers else agent_name(nodes[0])
        pods.append(Pod(name, tuple(nodes), _renumbered(devices)))
    return tuple(pods)


def _renumbered(devices: dict[str, str]) -> dict[str, str]:
    """Each kind's distinct indices as 0, 1, ... in order: what the container sees of the devices it was given."""
    indices: dict[str, list[str]] = {}
    for device in sorted(set(devices.values())):
        kind, _, index = device.partition(":")
        if index:
            indices.setdefault(kind, []).append(index)
    for kind in indices:
        indices[kind].sort(key=int)
    renumbered = {}
    for node, device in devices.items():
        kind, _, index = device.partition(":")
        renumbered[node] = f"{kind}:{indices[kind].index(index)}" if index else device
    return renumbered


def placement_overrides(pods: tuple[Pod, ...]) -> list[str]:
    """``--set`` assignments that put every node on its pod and its device there."""
    return [f"nodes.{node}.place.{key}={value}" for pod in pods for node in pod.nodes
            for key, value in (("host", pod.host), ("device", pod.devices[node]))]


def pod_resources(pod: Pod, plan: Plan, report: MemoryReport, headroom_bytes: int) -> PodResources:
    """What ``pod`` requests: see the module's docstring."""
    memory = {m.node: m for m in report.nodes}
    workers = sum(plan.nodes[node].replicas for node in pod.nodes)
    accelerators: dict[str, int] = {}
    for device in set(pod.devices.values()):
        kind = device.partition(":")[0]
        if kind in ACCELERATOR_RESOURCES:
            accelerators[ACCELERATOR_RESOURCES[kind]] = accelerators.get(ACCELERATOR_RESOURCES[kind], 0) + 1
    rdma = any(edge.protocol == "rdma" for edge in plan.edges if {edge.source, edge.target} & set(pod.nodes))
    return PodResources(
        memory_bytes=sum(memory[node].total_bytes for node in pod.nodes) + (workers + 1) * headroom_bytes,
        accelerators=accelerators, rdma=rdma, processes=workers + 1)
