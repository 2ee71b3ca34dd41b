"""Which pod each node of a graph runs in on a cluster, on which device there, and what each pod requests.

The controller in the serving head reaches an agent by its name: a node with ``place.host: NAME`` runs on the
agent that announced itself as NAME (``place.host: any`` would pick among all agents by free memory, so a node
could land on another node's pod). So every node gets a Deployment of its own whose pod runs ``engine agent
--name <the Deployment's name>``, and the rendered graph places the node on that name. The controller puts every
replica of a node on that one agent: the node's replicas are worker processes in the one pod, sharing its device,
and the pod requests the memory of all of them. The serving head runs no node of the graph and needs no
accelerator: the final outputs come back to it over the data plane (:mod:`engine.plan.collector`) and request
files leave from it (:mod:`engine.plan.feeder`), each a CPU worker of the plan's own.

A container sees the accelerator it was given as ``cuda:0``: the graph's ``cuda:3`` is ``cuda:0`` in its pod.

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
    devices: dict[str, tuple[str, ...]]  #: node -> its devices inside the pod, rank by rank (one for most nodes)

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
    nodes: tuple[str, ...]  #: the plan's nodes it runs a worker of per replica


def agent_name(node: str) -> str:
    """A node's Deployment and agent name: a DNS label (node names are ``[a-z][a-z0-9_]*``), never 'local' or 'any'."""
    return "node-" + node.replace("_", "-")


def assign_pods(checked: CheckedGraph) -> tuple[Pod, ...]:
    """The serving head, then one agent pod per node of the graph, in graph order."""
    nodes = checked.loaded.spec.nodes
    return (Pod(HEAD, (), {}),
            *(Pod(agent_name(name), (name,), {name: _in_pod(node.place.all_devices)}) for name, node in nodes.items()))


def _in_pod(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The devices as the pod's container sees them: the accelerators it was given are numbered from 0 (a node on
    cuda:3 sees cuda:0; one on cuda:2 and cuda:5, cuda:0 and cuda:1); cpu stays cpu."""
    return tuple(f"{device.partition(':')[0]}:{rank}" if ":" in device else device for rank, device in enumerate(devices))


def placement_overrides(pods: tuple[Pod, ...]) -> list[str]:
    """``--set`` assignments that put every node on its pod and its device there."""
    return [f"nodes.{node}.place.{key}={value}" for pod in pods for node in pod.nodes
            for key, value in (("host", pod.host), _device_setting(pod.devices[node]))]


def _device_setting(devices: tuple[str, ...]) -> tuple[str, str]:
    return ("device", devices[0]) if len(devices) == 1 else ("devices", f"[{', '.join(devices)}]")


def pod_resources(pod: Pod, plan: Plan, report: MemoryReport, headroom_bytes: int) -> PodResources:
    """What ``pod`` requests: see the module's docstring. Its workers are the plan's nodes on its host: the graph's
    nodes given to it, and for the head the collector and feeder the plan adds there."""
    memory = {m.node: m for m in report.nodes}
    nodes = [name for name, node in plan.nodes.items() if node.host == pod.host]
    workers = sum(plan.nodes[node].most_replicas * plan.nodes[node].ranks for node in nodes)
    accelerators: dict[str, int] = {}
    for device in {device for devices in pod.devices.values() for device in devices}:
        kind = device.partition(":")[0]
        if kind in ACCELERATOR_RESOURCES:
            accelerators[ACCELERATOR_RESOURCES[kind]] = accelerators.get(ACCELERATOR_RESOURCES[kind], 0) + 1
    rdma = any(edge.protocol == "rdma" for edge in plan.edges if {edge.source, edge.target} & set(nodes))
    return PodResources(
        memory_bytes=sum(memory[node].total_bytes for node in nodes) + (workers + 1) * headroom_bytes,
        accelerators=accelerators, rdma=rdma, nodes=tuple(nodes))
