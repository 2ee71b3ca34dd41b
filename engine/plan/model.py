"""The plan: an immutable description of what runs where, derived from a valid graph.

Everything after planning (deploy, control, transport, runtime) reads this and never the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.spec.schema import Parallel, PreviewSpec, Scaling, StepCacheSpec, Timeouts
from engine.stages import RequestParams

#: Every tensor in an edge payload starts at a multiple of this many bytes (one cache line). The transport packs
#: payloads with it and the planner sizes receive slots with it.
PAYLOAD_ALIGNMENT = 64


def align(nbytes: int, alignment: int = PAYLOAD_ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor an edge carries, at the largest request the graph admits."""

    name: str
    dtype: str  #: concrete dtype name (``model`` resolved)
    shape: tuple[int, ...]
    nbytes: int
    optional: bool
    variable: tuple[int, ...]
    producer: str  #: stage that writes it
    consumers: tuple[str, ...]  #: stages that read it
    expression: tuple[int | str, ...]  #: the shape as the producing stage declares it, for any request
    #: the request's size fields its shape grows with (``height``...), or what else sized it (the input file)
    sized_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedEdge:
    name: str
    source: str
    target: str
    transport: str  #: mooncake or shm (``auto`` resolved)
    protocol: str | None  #: tcp or rdma for mooncake; None: the environment's default
    integrity: str
    retries: int
    slots: int
    tensors: tuple[PlannedTensor, ...]
    line: int | None

    @property
    def slot_bytes(self) -> int:
        """Receive-slot size: every tensor at its largest shape, each start aligned."""
        return sum(align(t.nbytes) for t in self.tensors)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def sized_by(self) -> tuple[str, ...]:
        """What its slot grows with: the size fields of its tensors' shapes (and the input file, for the feeder's)."""
        return tuple(dict.fromkeys(name for t in self.tensors for name in t.sized_by))


@dataclass(frozen=True)
class PlannedNode:
    name: str
    stages: tuple[str, ...]
    components: tuple[str, ...]
    host: str
    device: str
    replicas: int
    dtype: str
    memory_bytes: int | None  #: declared in the graph; None: detect
    rdma_device: str | None  #: the NIC for Mooncake RDMA; None: the environment's default
    line: int | None
    #: every replica's devices, rank by rank (``device`` is the first); one unless the node splits
    devices: tuple[str, ...] = ()
    parallel: Parallel = field(default_factory=Parallel)

    @property
    def ranks(self) -> int:
        return max(1, len(self.devices))
    cache: StepCacheSpec | None = None  #: step caching of the node's DiT loop; None: none unless a request asks
    preview: PreviewSpec | None = None  #: previews of the node's DiT loop; None: none unless a request asks
    #: per stage, the backends to try in order (engine.backends); a stage not named runs eager
    backends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    strict: bool = False  #: a stage's first backend failing fails the request instead of falling back
    max_replicas: int | None = None  #: most replicas of an elastic node (``replicas`` is its fewest); None: fixed
    threads: int | None = None  #: torch threads per replica (``place.threads``); None: a share of the host's cores
    output_cache_bytes: int = 0  #: stage outputs each replica may keep for repeated inputs

    @property
    def most_replicas(self) -> int:
        """The replicas this node may run at once: what memory, credentials and buffers are planned for."""
        return self.max_replicas or self.replicas


@dataclass(frozen=True)
class Segment:
    """Consecutive stages of a request that run on one node without leaving it."""

    index: int
    node: str
    stages: tuple[str, ...]
    inputs: tuple[str, ...]  #: tensors it reads that come from other nodes
    outputs: tuple[str, ...]  #: tensors it writes that other nodes read (or final outputs)


@dataclass(frozen=True)
class Plan:
    graph: str
    file: str
    family: str
    task: str
    model_path: str
    dtype: str
    broker: str
    nodes: dict[str, PlannedNode]
    edges: tuple[PlannedEdge, ...]
    segments: tuple[Segment, ...]
    final_outputs: tuple[str, ...]
    request_defaults: dict[str, Any]
    requests: tuple[RequestParams, ...]
    limits: dict[str, int]
    timeouts: Timeouts
    base_dir: str
    #: component folder -> its config.json, as the plan checked them: what a stage needs of a component it does
    #: not hold comes from here
    configs: dict[str, dict[str, Any]]
    component_folders: dict[str, str] = field(default_factory=dict)
    #: size field -> where its value in ``limits`` comes from: limits, requests, request defaults or family default
    sized_from: dict[str, str] = field(default_factory=dict)
    scaling: Scaling = field(default_factory=Scaling)

    def edge_between(self, source: str, target: str) -> PlannedEdge:
        return next(e for e in self.edges if e.source == source and e.target == target)

    def edges_into(self, node: str) -> tuple[PlannedEdge, ...]:
        return tuple(e for e in self.edges if e.target == node)

    def edges_from(self, node: str) -> tuple[PlannedEdge, ...]:
        return tuple(e for e in self.edges if e.source == node)
