"""The graph file format as pydantic models: plain data, checked field by field.

This module knows nothing of model families or of the rest of the engine; cross-references (stages,
nodes, edges, tensors) are checked in :mod:`engine.plan`, which reads these models and never the YAML.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

DEVICE_PATTERN = re.compile(r"^(cpu|cuda:\d+|xpu:\d+)$")
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
#: The broker forms the control plane accepts (``engine.control.broker.parse_broker`` checks the details).
BROKER_PATTERN = re.compile(r"^(embedded(:[a-z]+)?(@[^\s/?#@]+)?|mqtts?://[^\s/?#]+/?)$")
MEMORY_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
MEMORY_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
INTEGRITY = ("xxh3-128", "none")
#: What may run a stage (engine.backends): eager PyTorch, torch.compile, or an exported graph on a runtime.
Backend = Literal["eager", "compile", "onnxruntime", "openvino", "tensorrt"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dtype(value: Any) -> Any:
    if isinstance(value, str) and value in DTYPE_NAMES:
        return DTYPE_NAMES[value]
    raise ValueError(f"got {value!r}; expected one of bf16, fp16, fp32 (or bfloat16, float16, float32)")


def parse_memory(text: str) -> int:
    match = MEMORY_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"got {text!r}; expected a size such as 80GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


class ModelSpec(Strict):
    family: str = Field(description="Model family, e.g. wan or qwen_image.")
    task: str = Field(description="Task of the family, e.g. t2v, i2v, t2i, edit.")
    path: str = Field(description="A preset (tiny), a diffusers-layout folder, or a Hugging Face repo id.")
    dtype: str = Field("bfloat16", description="Default weight and activation dtype: bf16, fp16 or fp32.")

    _check_dtype = field_validator("dtype", mode="before")(_dtype)


def _device(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise ValueError(f"got {value!r}; expected cpu, cuda:N or xpu:N (N a device index, e.g. cuda:0)")
    return value


Device = Annotated[str, AfterValidator(_device)]


class Place(Strict):
    host: str = Field("local", min_length=1, description="Host running the node: local, or an agent's host name.")
    device: Device = Field(description="Device: cpu, cuda:N or xpu:N (with devices: the first of them).")
    devices: list[Device] | None = Field(
        None, min_length=2, max_length=64,
        description="Several devices for one replica, one worker process (rank) each, split as `parallel:` says; "
                    "[cpu, cpu] is two CPU ranks.")
    memory: str | None = Field(None, description="Memory to plan against (80GiB); default: detected.")
    rdma_device: str | None = Field(
        None, min_length=1,
        description="RDMA NIC this node's Mooncake edges use, e.g. mlx5_0; default: ENGINE_MOONCAKE_DEVICE, else Mooncake's choice.")
    threads: int | None = Field(
        None, ge=1, le=1024,
        description="CPU threads each replica's torch uses (intra- and inter-op); default: its share of the host's cores, "
                    "split among the workers there by the work each does.")

    @model_validator(mode="before")
    @classmethod
    def _first_device(cls, value: Any) -> Any:
        """``devices`` names the replica's devices; ``device`` is then its first (rank 0's)."""
        if isinstance(value, dict) and isinstance(value.get("devices"), list) and value["devices"]:
            if "device" in value and value["device"] != value["devices"][0]:
                raise ValueError("give either device (one device) or devices (several), not both")
            return {**value, "device": value["devices"][0]}
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_memory(value)
        return value

    @property
    def memory_bytes(self) -> int | None:
        return parse_memory(self.memory) if self.memory is not None else None

    @property
    def all_devices(self) -> tuple[str, ...]:
        """The replica's devices, rank by rank."""
        return tuple(self.devices) if self.devices else (self.device,)


class Parallel(Strict):
    """How one replica's work splits across its devices: the product of the degrees is the number of devices."""

    cfg: Literal[1, 2] = Field(1, description="Classifier-free guidance parallel: 2 computes the conditional and "
                                               "unconditional predictions on two ranks at once.")
    ulysses: int = Field(1, ge=1, le=64, description="Ulysses sequence parallel: each rank holds 1/N of the tokens "
                                                     "and 1/N of the attention heads inside attention.")

    @property
    def ranks(self) -> int:
        return self.cfg * self.ulysses




class StepCacheSpec(Strict):
    """Step caching on a DiT node, or for one request: reuse the previous pass's residual while the DiT's input
    barely changes between steps. Output-changing unless ``method`` is ``none`` or ``threshold`` is 0."""

    method: Literal["none", "teacache", "magcache", "fbcache"] = Field(
        description="none (every pass runs), teacache, magcache or fbcache (first-block cache).")
    threshold: float = Field(0.0, ge=0, le=10, description="How much change a skipped pass may hide (the method's own "
                                                           "measure); 0 never skips.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``teacache:0.2`` and ``none`` (a command-line option, a request field) mean the mapping."""
        if isinstance(value, str):
            method, _, threshold = value.partition(":")
            return {"method": method.strip(), **({"threshold": threshold.strip()} if threshold else {})}
        return value

    @property
    def active(self) -> bool:
        """Whether the DiT passes go through the cache at all (``none`` calls the transformer as it is)."""
        return self.method != "none"


class PreviewSpec(Strict):
    """Previews of a DiT node's denoising: a small JPEG of the predicted clean latent every ``every`` steps."""

    every: int = Field(ge=1, le=1000, strict=True, description="Steps between previews: at steps N, 2N, ... (a "
                                                               "request's preview_every overrides it; 0 there: none).")


class ReplicaBounds(Strict):
    """An elastic node's replica count (checked by ``NodeSpec.replicas``)."""

    min: int = Field(ge=1, le=64, description="Replicas always running (and at start).")
    max: int = Field(ge=1, le=64, description="Most replicas the service scales the node out to.")


class NodeSpec(Strict):
    stages: list[str] = Field(min_length=1, description="Stages this node runs, in order (exact names).")
    place: Place = Field(description="Where the node's replicas run.")
    replicas: int | ReplicaBounds = Field(
        1, description="Worker processes running this node: a number, or {min, max} for a count that follows the load.")
    output_cache: str = Field(
        "256MiB", description="Bytes of stage outputs each replica keeps for requests that repeat a cacheable stage's "
                              "inputs (a text encoder's prompt), least recently used first out; 0B: none.")
    dtype: str | None = Field(None, description="Overrides the model dtype for this node.")
    parallel: Parallel | None = Field(None, description="How a replica on several devices (place.devices) splits "
                                                         "its stages: {cfg: 2, ulysses: 2}.")
    cache: StepCacheSpec | None = Field(None, description="Step caching of the node's DiT loop (a node running a "
                                                          "denoise stage), e.g. {method: teacache, threshold: 0.2}; "
                                                          "a request's own cache field overrides it.")
    preview: PreviewSpec | None = Field(None, description="Previews of the node's denoising loop (a node running a "
                                                          "denoise stage), e.g. {every: 2}; off by default.")
    backend: dict[str, Annotated[list[Backend], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Per stage, the backends to try in order, e.g. {vae_decode: [onnxruntime, eager]}: the first that "
                    "works runs the stage; a stage not named runs eager.")
    strict: bool = Field(False, description="A stage whose first backend cannot run fails the request, naming the "
                                            "reason, instead of falling back to the next backend of its chain.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> Any:
        return None if value is None else _dtype(value)

    @field_validator("replicas", mode="before")
    @classmethod
    def _check_replicas(cls, value: Any) -> Any:
        expected = "expected a number of replicas (1-64) or {min: N, max: M} with 1 <= N <= M <= 64"
        if isinstance(value, dict):
            if set(value) != {"min", "max"} or not all(type(v) is int for v in value.values()):
                raise ValueError(f"got {value!r}; {expected}")
            value = (value["min"], value["max"])
            if not 1 <= value[0] <= value[1] <= 64:
                raise ValueError(f"got min {value[0]}, max {value[1]}; {expected}")
            return ReplicaBounds(min=value[0], max=value[1])
        if type(value) is not int or not 1 <= value <= 64:
            raise ValueError(f"got {value!r}; {expected}")
        return value

    @field_validator("output_cache")
    @classmethod
    def _output_cache(cls, value: str) -> str:
        parse_memory(value)
        return value

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas: equal for a fixed count."""
        if isinstance(self.replicas, ReplicaBounds):
            return self.replicas.min, self.replicas.max
        return self.replicas, self.replicas


class EdgeSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Edge name, e.g. phase1.")
    source: str = Field(alias="from", description="Node that produces the tensors.")
    target: str = Field(alias="to", description="Node that consumes them.")
    transport: Literal["auto", "mooncake", "shm"] = Field(
        "auto", description="mooncake (TCP/RDMA), shm (same host), auto (by placement).")
    protocol: Literal["tcp", "rdma"] | None = Field(
        None, description="Mooncake protocol, for mooncake edges: tcp or rdma; default: ENGINE_MOONCAKE_PROTOCOL, else tcp.")
    integrity: Literal["xxh3-128", "none"] = Field("xxh3-128", description="Payload digest checked before use.")
    retries: int = Field(3, ge=0, le=20, description="Retransmissions after a failed integrity check.")
    slots: int = Field(3, ge=1, le=64, description="Receive slots per target replica: requests in flight on this edge (pipelining depth).")


class Timeouts(Strict):
    ready_s: float = Field(300.0, gt=0, description="Wait for every replica to load and announce itself.")
    heartbeat_s: float = Field(10.0, gt=0, description="A replica silent this long is considered stuck.")
    stage_s: float = Field(3600.0, gt=0, description="Longest a stage may run for one request.")
    transfer_s: float = Field(30.0, gt=0, description="Longest one edge transfer may take.")
    broker_s: float = Field(60.0, gt=0, description="Longest the broker may be unreachable before the run fails "
                                                     "with 'broker lost'; shorter outages lose nothing.")
    lease_s: float = Field(10.0, gt=0, le=3600, description="Agents stop a run's workers when its controller has not "
                                                         "renewed their lease for this long (it died or was cut off).")


class Scaling(Strict):
    """How `engine serve` moves an elastic node (``replicas: {min, max}``) between its bounds."""

    window_s: float = Field(10.0, gt=0, le=3600, description="Seconds of heartbeats a decision to scale out looks at.")
    in_window_s: float = Field(30.0, gt=0, le=3600, description="Seconds of heartbeats a decision to scale in looks at: "
                                                                "longer, so that gaps between bursts do not remove a "
                                                                "replica the next burst needs.")
    cooldown_s: float = Field(10.0, ge=0, le=3600, description="Least seconds between two changes of one node.")
    out_busy: float = Field(0.8, gt=0, le=1, description="Busy share of the node's replicas above which it scales out.")
    out_waiting: float = Field(1.0, gt=0, description="Segments waiting per replica above which it scales out.")
    in_busy: float = Field(0.2, ge=0, lt=1, description="It scales in when one replica fewer would be busy less than "
                                                        "this share (and nothing waits).")

    @model_validator(mode="after")
    def _apart(self) -> Scaling:
        if self.in_window_s < self.window_s:
            raise ValueError(f"in_window_s {self.in_window_s:g} must be at least window_s {self.window_s:g}")
        if self.in_busy * 2 > self.out_busy:
            raise ValueError(f"in_busy {self.in_busy:g} must be at most half of out_busy {self.out_busy:g}, or a steady "
                             "load would scale the node out and in again")
        return self


def _node_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"node name {name!r} must be lower-case letters, digits and _ (starting with a letter)")
    return name


#: A node name, checked as a key of ``nodes`` so that an error names the node's own line.
NodeName = Annotated[str, AfterValidator(_node_name)]


class GraphSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Graph name.")
    model: ModelSpec
    broker: str = Field("embedded", description="embedded (on loopback), embedded@ADDRESS[:PORT] (agents on other hosts "
                                                "reach it), mqtt://[user:pass@]host:port or mqtts://...")
    nodes: dict[NodeName, NodeSpec] = Field(min_length=1, description="Placement units by name.")
    edges: list[EdgeSpec] = Field(default_factory=list, description="Tensor flows between nodes.")
    request: dict[str, Any] = Field(default_factory=dict, description="Request defaults of the model's parameters.")
    requests: list[dict[str, Any]] = Field(default_factory=list, description="Requests `engine run` submits.")
    limits: dict[str, int] = Field(default_factory=dict, description="Largest value of size parameters (height, width, num_frames) a request may use; sizes edge buffers.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    scaling: Scaling = Field(default_factory=Scaling)

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        if not BROKER_PATTERN.match(value):
            raise ValueError(f"got {value!r}; expected embedded, embedded@ADDRESS[:PORT], mqtt://[user:pass@]host:port or "
                             "mqtts://[user:pass@]host:port")
        return value
