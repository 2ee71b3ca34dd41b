"""What one worker process is told to be: its node, replica, model, device, edges and broker.

The controller derives a :class:`WorkerSpec` per node replica from the plan and hands it to the worker as
a JSON file, and the worker's :class:`WorkerSecrets` (broker password, the run's signing key) through the
worker's standard input: no secret is ever on a command line or on disk. The worker reads nothing else: not
the graph file, not the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.plan.cpu_budget import budgeted, cpu_shares
from engine.plan.model import Plan, PlannedTensor
from engine.spec.schema import Parallel
from engine.spec.schema import PreviewSpec, StepCacheSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeEnd(_Frozen):
    """One end of an edge as a worker sees it."""

    name: str
    peer: str = Field(description="node at the other end")
    transport: str
    protocol: str | None = Field(description="tcp or rdma on a mooncake edge; None: the environment's default")
    integrity: str
    retries: int
    slot_bytes: int
    slots: int
    tensors: tuple[str, ...]
    declared: tuple[PlannedTensor, ...] = Field(
        description="the tensors as the plan declares them (dtype, shape expression): what a receiver expects")


class SegmentSpec(_Frozen):
    index: int
    stages: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class WorkerSpec(_Frozen):
    run_id: str
    node: str
    replica: int
    family: str
    task: str
    source: str = Field(description="local diffusers-layout folder of the model")
    configs: dict[str, dict[str, Any]] = Field(description="component folder -> config.json, as the plan checked them")
    device: str
    devices: tuple[str, ...] = Field((), description="a several-device replica's devices, rank by rank (rank 0 on "
                                                         "device); empty for one device")
    parallel: Parallel = Field(default_factory=Parallel, description="how the ranks split the node's stages")
    rdma_device: str | None = Field(description="RDMA NIC for mooncake edges; None: the environment's default")
    dtype: str
    components: tuple[str, ...]
    stages: tuple[str, ...]
    segments: tuple[SegmentSpec, ...]
    inbound: tuple[EdgeEnd, ...]
    outbound: tuple[EdgeEnd, ...]
    final_outputs: tuple[str, ...]
    broker: dict[str, Any] = Field(description="the broker's address (host, port, user name, TLS files); no password")
    out_dir: str
    heartbeat_s: float
    broker_timeout_s: float = Field(description="how long the broker may be away before the worker gives up")
    transfer_timeout_s: float
    collective_timeout_s: float = Field(10.0, description="longest a rank waits in a collective for the others")
    save_frames: bool
    meta: dict[str, str] = Field(description="graph name, file and model path, written beside outputs")
    cache: StepCacheSpec | None = Field(None, description="the node's step caching; a request's cache field overrides it")
    preview: PreviewSpec | None = Field(None, description="the node's previews; a request's preview_every overrides it")
    backends: dict[str, tuple[str, ...]] = Field(default_factory=dict, description="stage -> backends to try in order")
    strict_backends: bool = Field(False, description="a stage's first backend failing fails the request")
    limits: dict[str, int] = Field(default_factory=dict, description="the graph's largest sizes (the plan's limits): "
                                                                     "what a stage's dynamic artifacts serve")
    cpu_share: float = Field(gt=0, le=1, description="fraction of its host's cores its torch threads may use")
    cpu_budget: bool = Field(False, description="whether its torch threads follow cpu_share; False: torch's default "
                                                "(place.threads still fixes them)")
    threads: int | None = Field(description="torch threads fixed by the graph (place.threads); None: from cpu_share")
    output_cache_bytes: int = Field(ge=0, description="stage outputs it may keep for repeated inputs (0: none)")
    stream_video: bool = Field(False, description="whether the video it writes also grows as <stem>.stream.mp4 while "
                                                  "it is decoded (engine.stream)")

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        return cls.model_validate_json(path.read_text())


class WorkerSecrets(_Frozen):
    """What a worker must know and nobody else: handed over on its standard input, one JSON line."""

    broker_password: str | None = Field(repr=False, description="the worker's broker password, None without one")
    run_key: str = Field(repr=False, pattern=r"^[0-9a-f]{64}$", description="the run's signing key, hex")

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.run_key)


def worker_specs(plan: Plan, **settings: Any) -> list[WorkerSpec]:
    """One spec per replica the plan starts with, in plan order, the cores of each host split evenly among the
    replicas there (``settings`` as :func:`spec_maker` takes them)."""
    keys = [(node.name, replica) for node in plan.nodes.values() for replica in range(node.replicas)]
    shares = cpu_shares(budgeted(plan, keys), {})
    make = spec_maker(plan, **settings)
    return [make(node, replica, shares.get((node, replica), 1.0)) for node, replica in keys]


def spec_maker(plan: Plan, *, run_id: str, source: Path, broker: Callable[[str, int], dict[str, Any]], out_dir: Path,
               save_frames: bool, heartbeat_s: float, cpu_budget: bool = False,
               stream_video: bool = False) -> Callable[..., WorkerSpec]:
    """The spec of any replica of any node (an elastic node's later ones too): ``make(node, replica, cpu_share,
    device=None)``, on ``device`` if given (a scale-out placed elsewhere) else its node's; ``broker(node, replica)``
    is that replica's broker address."""
    def end(edge, peer: str) -> EdgeEnd:  # noqa: ANN001 - PlannedEdge
        return EdgeEnd(name=edge.name, peer=peer, transport=edge.transport, protocol=edge.protocol, integrity=edge.integrity,
                       retries=edge.retries, slot_bytes=edge.slot_bytes, slots=edge.slots, tensors=edge.tensor_names,
                       declared=edge.tensors)

    def spec(name: str, replica: int, cpu_share: float, device: str | None = None) -> WorkerSpec:
        node = plan.nodes[name]
        segments = tuple(SegmentSpec(index=s.index, stages=s.stages, inputs=s.inputs, outputs=s.outputs)
                         for s in plan.segments if s.node == node.name)
        return WorkerSpec(
            run_id=run_id, node=node.name, replica=replica, family=plan.family, task=plan.task,
            source=str(source), device=device or node.device, devices=node.devices if node.ranks > 1 else (),
            parallel=node.parallel, collective_timeout_s=plan.timeouts.heartbeat_s, rdma_device=node.rdma_device, dtype=node.dtype, components=node.components,
            configs=plan.configs,
            stages=node.stages, segments=segments,
            inbound=tuple(end(e, e.source) for e in plan.edges_into(node.name)),
            outbound=tuple(end(e, e.target) for e in plan.edges_from(node.name)),
            final_outputs=written_by(plan, node.name), broker=broker(node.name, replica), out_dir=str(out_dir),
            heartbeat_s=heartbeat_s, broker_timeout_s=plan.timeouts.broker_s, transfer_timeout_s=plan.timeouts.transfer_s, save_frames=save_frames,
            meta={"graph": plan.graph, "graph_file": plan.file, "model": plan.model_path, "family": plan.family,
                  "task": plan.task, "dtype": node.dtype},
            cpu_share=cpu_share, cpu_budget=cpu_budget, threads=node.threads, output_cache_bytes=node.output_cache_bytes,
            cache=node.cache, preview=node.preview, backends=node.backends, strict_backends=node.strict, limits=plan.limits,
            stream_video=stream_video,
        )

    return spec


def written_by(plan: Plan, node: str) -> tuple[str, ...]:
    """The final outputs ``node`` writes to files: those it makes or receives and sends on to no other node."""
    sent = {name for edge in plan.edges_from(node) for name in edge.tensor_names}
    return tuple(name for name in plan.final_outputs if name not in sent)
