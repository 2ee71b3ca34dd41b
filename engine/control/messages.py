"""Every control message, as a frozen pydantic model, and its JSON encoding.

A message on the wire is one JSON object with a version ``v`` and a ``kind`` that selects the model. ``decode``
checks the envelope first (JSON object, known version, known kind) so that the error says which of those is
wrong, then validates the fields strictly: unknown keys, missing fields and wrong types are all errors. Payload
parts owned by the data plane (slot grants, manifests, transport locations) travel as JSON objects here and are
validated by the transport's own models where they are used.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from engine.errors import ControlError
from engine.stepcache.stats import StepCacheStats

VERSION = 1

JsonObject: TypeAlias = dict[str, Any]
ReplicaState: TypeAlias = Literal["starting", "loading", "ready", "busy", "stopping", "stopped", "failed", "dead"]

#: Request ids become file names and topic levels: letters, digits, . _ - only, never a path.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_GRAPH_NAME = r"^[a-z][a-z0-9_]{0,63}$"  # node and edge names, as the graph schema allows them

_NAME = Field(pattern=_GRAPH_NAME, description="node name, exactly as in the graph")
_REPLICA = Field(ge=0, le=1024, description="replica index of the node, from 0")
_REQUEST = Field(pattern=REQUEST_ID_PATTERN, description="request id (letters, digits, . _ -)")
_EDGE = Field(pattern=_GRAPH_NAME, description="edge name, exactly as in the graph")
_DELIVERY = Field(ge=0, description="which delivery of the payload this is, from 0; a retransmission increments it")
_ATTEMPT = Field(ge=0, description="dispatch attempt of this stage run, from 0; a retry increments it")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ReplicaRef(_Model):
    """One replica of one node: where an edge message comes from or a reply goes to."""

    node: str = _NAME
    replica: int = _REPLICA


class EdgeStats(_Model):
    """What one outgoing edge transfer of a stage run cost."""

    nbytes: int = Field(ge=0, description="payload bytes written to the receiver (tensors and alignment gaps)")
    tensor_bytes: int = Field(ge=0, description="bytes of the tensors themselves: the sum of their exact sizes")
    seconds: float = Field(ge=0, description="wall time from grant request to acknowledgement")
    digest: str = Field(min_length=1, description="xxh3-128 digest of the payload, hex")
    rejected: int = Field(0, ge=0, description="deliveries the receiver rejected (failed verification) before one passed")


class Status(_Model):
    """A replica's lifecycle state; published retained on its status topic and used as its last will."""

    v: Literal[1] = VERSION
    kind: Literal["status"] = "status"
    node: str = _NAME
    replica: int = _REPLICA
    state: ReplicaState = Field(description="lifecycle state; 'dead' is only ever sent as the last will")
    pid: int = Field(gt=0, description="worker process id")
    host: str = Field(min_length=1, description="host name the worker runs on")
    detail: str | None = Field(default=None, description="error text for failed/dead, otherwise None")
    receive_edges: dict[str, JsonObject] | None = Field(
        default=None, description="at ready: edge name -> transport location of this replica's receive slots"
    )
    param_bytes: int | None = Field(default=None, ge=0, description="at ready: resident parameter bytes")
    load_s: float | None = Field(default=None, ge=0, description="at ready: seconds spent loading components")

    @model_validator(mode="after")
    def _ready_announces_itself(self) -> Status:
        if self.state == "ready" and (self.receive_edges is None or self.param_bytes is None or self.load_s is None):
            raise ValueError("state 'ready' needs receive_edges, param_bytes and load_s")
        return self


class Heartbeat(_Model):
    """Periodic liveness and progress of a replica; progress that stops moving means the replica is stuck."""

    v: Literal[1] = VERSION
    kind: Literal["heartbeat"] = "heartbeat"
    node: str = _NAME
    replica: int = _REPLICA
    seq: int = Field(ge=0, description="heartbeat number since the worker started")
    request_id: str | None = Field(description="request being computed, None when idle")
    stage: str | None = Field(description="stage being computed, None when idle")
    step: int = Field(ge=0, description="steps of the current stage done")
    total_steps: int = Field(ge=0, description="steps the current stage takes (0 when idle or not step-based)")
    requests_done: int = Field(ge=0, description="requests this replica finished since it started")
    rss_bytes: int = Field(ge=0, description="resident memory of the worker process")
    rejected: int = Field(ge=0, description="control messages this replica refused (unsigned, forged, replayed...)")
    time: float = Field(description="sender's wall clock (time.time()) when sent")
    busy_s: float = Field(0.0, ge=0, description="seconds the replica has spent on requests since it started")
    waiting: int = Field(0, ge=0, description="segments dispatched to the replica that wait for it to start them")


class RunStage(_Model):
    """Controller -> replica: run this node's stages for a request."""

    v: Literal[1] = VERSION
    kind: Literal["run_stage"] = "run_stage"
    request_id: str = _REQUEST
    request: JsonObject = Field(description="the request's parameters (prompt, seed, sizes, ...)")
    node: str = _NAME
    attempt: int = _ATTEMPT
    deadline_s: float = Field(gt=0, description="seconds the replica has to finish, from receipt")
    segment: int = Field(ge=0, description="which of the plan's segments (runs of stages on one node) to run")
    send_to: dict[str, int] = Field(description="outgoing edge name -> replica index of the receiving node")


class BackendStep(_Model):
    """One backend of a stage's chain, for one request."""

    backend: str = Field(min_length=1)
    reason: str | None = Field(description="why it did not run the stage (import_error, run_error...); None: it ran it")
    detail: str = Field(description="what failed, in words")


class BackendUse(_Model):
    """How one stage with a backend chain ran for a request (engine.backends)."""

    asked: str = Field(min_length=1, description="the first backend of the chain")
    used: str = Field(min_length=1, description="the backend that ran the stage")
    chain: list[BackendStep] = Field(description="the backends tried, in order, ending with the one used")
    cache: str | None = Field(description="resident, hit, built or rebuilt (stale: ...); None without artifacts")
    shapes: str | None = Field(None, description="the artifact's shapes: static (its size only), or the range a dynamic "
                                                 "one serves (1x16x1x2..8x2..12); None without artifacts")
    build_s: float = Field(ge=0, description="seconds spent building artifacts (or compiling) for this request")
    load_s: float = Field(ge=0, description="seconds spent loading artifacts for this request")
    run_ms: float = Field(ge=0, description="milliseconds the backend ran")
    parity: dict[str, float | bool | str] | None = Field(description="the artifact's figures against eager")
    versions: dict[str, str] = Field(description="backend -> its version, for each one that loaded")


class StageDone(_Model):
    """Replica -> controller: the node's stages finished for a request."""

    v: Literal[1] = VERSION
    kind: Literal["stage_done"] = "stage_done"
    request_id: str = _REQUEST
    node: str = _NAME
    replica: int = _REPLICA
    attempt: int = _ATTEMPT
    timings: dict[str, float] = Field(description="stage name -> seconds it took")
    edges: dict[str, EdgeStats] = Field(description="outgoing edge name -> transfer statistics")
    outputs: list[str] = Field(description="files written for the request's final outputs (empty before the last segment)")
    peak_rss_bytes: int = Field(ge=0, description="peak resident memory of the worker process so far")
    step_cache: dict[str, StepCacheStats] = Field(
        default_factory=dict, description="stage name -> DiT passes it ran and skipped (stages with a DiT loop)")
    backends: dict[str, BackendUse] = Field(default_factory=dict, description="stage -> how its backend chain ran")
    cached: dict[str, bool] = Field(default_factory=dict, description="cacheable stage, or stage/part for a stage cached "
                                    "part by part -> whether its outputs came from the replica's output cache (a hit: "
                                    "the stage or part did not run)")
    saved_s: float = Field(0.0, ge=0, description="seconds the cache hits saved (what those stages took when they ran)")
    waited_s: float = Field(0.0, ge=0, description="seconds the segment waited in the replica's queue before it started")
    busy_s: float = Field(0.0, ge=0, description="seconds the replica spent on the segment (stages, sending, writing)")


class StageFailed(_Model):
    """Replica -> controller: the node's stages failed for a request."""

    v: Literal[1] = VERSION
    kind: Literal["stage_failed"] = "stage_failed"
    request_id: str = _REQUEST
    node: str = _NAME
    replica: int = _REPLICA
    attempt: int = _ATTEMPT
    stage: str | None = Field(description="the stage that failed, None if it failed outside a stage")
    error_type: str = Field(min_length=1, description="exception class name, e.g. 'EdgeTimeout'")
    error: str = Field(description="exception text")
    traceback_tail: str = Field(description="last lines of the traceback")
    log_tail: str = Field(description="last lines of the worker's log")


#: The most a preview message carries: 64 KiB of JPEG, base64-encoded (workers make them at most 48 KiB).
PREVIEW_JPEG_BYTES = 64 << 10
PREVIEW_B64_CHARS = 4 * -(-PREVIEW_JPEG_BYTES // 3)


class Preview(_Model):
    """Replica -> controller: a small picture of what a request's denoising predicts after a step (engine.preview)."""

    v: Literal[1] = VERSION
    kind: Literal["preview"] = "preview"
    request_id: str = _REQUEST
    node: str = _NAME
    replica: int = _REPLICA
    attempt: int = _ATTEMPT
    stage: str = Field(pattern=_GRAPH_NAME, description="the stage whose loop made it (denoise)")
    step: int = Field(ge=1, description="steps of the stage done when it was made")
    total_steps: int = Field(ge=1, le=10_000, description="steps the stage takes")
    width: int = Field(ge=1, le=4096, description="pixels across the picture")
    height: int = Field(ge=1, le=4096, description="pixels down the picture")
    jpeg_b64: str = Field(min_length=4, max_length=PREVIEW_B64_CHARS, pattern=r"^[A-Za-z0-9+/]+={0,2}$",
                          description="the picture, a JPEG, base64-encoded")

    @model_validator(mode="after")
    def _step_within_stage(self) -> Preview:
        if self.step > self.total_steps:
            raise ValueError(f"step {self.step} is past the stage's {self.total_steps} steps")
        return self


class GrantRequest(_Model):
    """Sender -> receiving replica: ask for a slot to write one edge payload into."""

    v: Literal[1] = VERSION
    kind: Literal["grant_request"] = "grant_request"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    sender: ReplicaRef = Field(description="replica that will write and waits for the grant")
    nbytes: int = Field(ge=0, description="payload bytes the sender will write")


class Grant(_Model):
    """Receiver -> sender: a slot granted for one edge payload."""

    v: Literal[1] = VERSION
    kind: Literal["grant"] = "grant"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    receiver: ReplicaRef = Field(description="replica that owns the slot")
    grant: JsonObject | None = Field(description="the transport's SlotGrant as a JSON object; None when refused")
    error: str | None = Field(description="why no slot can be granted (payload larger than a slot...); None when granted")

    @model_validator(mode="after")
    def _grant_or_error(self) -> Grant:
        if (self.grant is None) == (self.error is None):
            raise ValueError("a grant carries exactly one of grant (granted) and error (refused)")
        return self


class Landed(_Model):
    """Sender -> receiver, a hint: these byte ranges of the granted slot hold their final bytes (hash them now)."""

    v: Literal[1] = VERSION
    kind: Literal["landed"] = "landed"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    sender: ReplicaRef = Field(description="replica writing the payload")
    slot: int = Field(ge=0, description="slot of the receiver's pool being written")
    generation: int = Field(ge=0, description="generation of the grant being written")
    ranges: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        max_length=4096, description="[start, stop) payload byte ranges that landed"
    )


class Delivered(_Model):
    """Sender -> receiver: the payload is in the granted slot; verify it against the manifest."""

    v: Literal[1] = VERSION
    kind: Literal["delivered"] = "delivered"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    delivery: int = _DELIVERY
    sender: ReplicaRef = Field(description="replica that wrote the payload")
    manifest: JsonObject = Field(description="the transport's Manifest as a JSON object")
    request: JsonObject = Field(
        description="the request's parameters, as the controller dispatched them: the receiver evaluates the plan's "
                    "shapes for them and refuses a payload that differs"
    )


class Ack(_Model):
    """Receiver -> sender: the delivered payload verified (ok) or not (reason)."""

    v: Literal[1] = VERSION
    kind: Literal["ack"] = "ack"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    delivery: int = _DELIVERY
    receiver: ReplicaRef = Field(description="replica that verified the payload")
    ok: bool = Field(description="whether the payload verified")
    reason: str | None = Field(description="why it did not verify; None when ok")
    tensors: list[str] = Field(description="tensors whose bytes failed verification (empty when ok or unknown)")
    retryable: bool = Field(description="whether writing the payload again into the same slot may succeed")

    @model_validator(mode="after")
    def _reason_iff_not_ok(self) -> Ack:
        if self.ok == (self.reason is not None):
            raise ValueError("an ack has a reason exactly when ok is false")
        return self


class Fence(_Model):
    """Sender -> receiver: abandon a granted slot (failed or timed-out write); its generation must not be used."""

    v: Literal[1] = VERSION
    kind: Literal["fence"] = "fence"
    request_id: str = _REQUEST
    edge: str = _EDGE
    attempt: int = _ATTEMPT
    sender: ReplicaRef = Field(description="replica that held the grant")
    grant: JsonObject = Field(description="the SlotGrant being fenced, as a JSON object")
    reason: str = Field(min_length=1, description="why the slot is fenced")


class Shutdown(_Model):
    """Controller -> every replica: stop after the current stage and exit."""

    v: Literal[1] = VERSION
    kind: Literal["shutdown"] = "shutdown"
    reason: str = Field(min_length=1, description="why the run ends, for the workers' logs")


class CpuShare(_Model):
    """Controller -> a replica: its share of its host's cores changed (replicas came or went there, or the work each
    does moved); its torch threads follow from the next stage on, unless the graph fixes them (``place.threads``)."""

    v: Literal[1] = VERSION
    kind: Literal["cpu_share"] = "cpu_share"
    share: float = Field(gt=0, le=1, description="fraction of the host's cores this replica's threads may use")


class ReplicaRestarting(_Model):
    """Controller -> every other replica: this replica is started again (its process died); what its earlier
    process said no longer stands, and the new one signs from sequence number 0."""

    v: Literal[1] = VERSION
    kind: Literal["replica_restarting"] = "replica_restarting"
    node: str = _NAME
    replica: int = _REPLICA


class Cancel(_Model):
    """Controller -> a replica: drop a request (cancelled, or past its deadline): skip it if queued, stop it at
    the next denoising step if running, release what it holds in the receive pools."""

    v: Literal[1] = VERSION
    kind: Literal["cancel"] = "cancel"
    request_id: str = _REQUEST
    reason: str = Field(min_length=1, max_length=1024, description="why, for the worker's log")


#: Agent names and order ids: letters, digits, . _ - (they are topic levels and client ids).
AGENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class DeviceInfo(_Model):
    """A device an agent offers."""

    name: str = Field(pattern=r"^(cpu|cuda:\d+|xpu:\d+)$", description="device as a graph names it")
    total_bytes: int | None = Field(ge=0, description="memory of the device; None where unknown")
    free_bytes: int | None = Field(ge=0, description="memory free now; None where unknown")


class AgentBirth(_Model):
    """Agent -> everyone, retained on its birth topic: who it is and what it offers; 'offline' is its last will."""

    v: Literal[1] = VERSION
    kind: Literal["agent_birth"] = "agent_birth"
    agent: str = Field(pattern=AGENT_NAME_PATTERN, description="the agent's name, as graphs place nodes on it")
    state: Literal["online", "offline"] = Field(description="'offline' is only ever sent as the last will")
    version: str = Field(max_length=64, description="engine version of the agent")
    address: str = Field(max_length=255, description="address its workers' Mooncake engines listen on")
    devices: list[DeviceInfo] = Field(max_length=64, description="devices with their memory")
    rdma_devices: list[str] = Field(max_length=64, description="RDMA NICs found on the host")
    families: list[str] = Field(max_length=64, description="model families it can run")
    models: list[str] = Field(max_length=1024, description="model folders it may load (its --models folders)")
    running: list[str] = Field(max_length=1024, description="runs it has workers of")
    time: float = Field(description="sender's wall clock when sent: a retained birth that stops moving is stale")
    own_identity: bool = Field(default=False, description="its broker user is its alone (engine agents add): each "
                                                          "worker it starts needs a broker user of its own, per run")


class AgentOrder(_Model):
    """Controller -> agent: start workers of a run (deploy), keep them (renew the lease), or stop them.

    Idempotent by ``order_id``: a repeated order is answered with the job's current state."""

    v: Literal[1] = VERSION
    kind: Literal["agent_order"] = "agent_order"
    order_id: str = Field(pattern=AGENT_NAME_PATTERN, description="the order's id, unique per run")
    run_id: str = Field(pattern=REQUEST_ID_PATTERN, description="the run the workers belong to")
    action: Literal["deploy", "renew", "stop"]
    lease_s: float = Field(gt=0, le=3600, description="the run's workers are stopped if no order renews them in time")
    workers: list[JsonObject] = Field(max_length=256, description="deploy: the WorkerSpec of each worker to start")


class AgentJob(_Model):
    """Agent -> the run's controller: where a deploy order stands, and how its workers ended."""

    v: Literal[1] = VERSION
    kind: Literal["agent_job"] = "agent_job"
    agent: str = Field(pattern=AGENT_NAME_PATTERN)
    order_id: str = Field(pattern=AGENT_NAME_PATTERN)
    run_id: str = Field(pattern=REQUEST_ID_PATTERN)
    state: Literal["queued", "starting", "ready", "failed", "stopped"]
    detail: str | None = Field(description="why it failed or stopped; None otherwise")
    exited: dict[str, str] = Field(description="'node/replica' -> how its process ended")
    log_tails: dict[str, str] = Field(description="'node/replica' -> the last lines its process logged")


class SubmitJob(_Model):
    """Client -> a service (``engine serve``): run this job; progress and the result go to the client's reply
    topic. ``job`` has the fields of the HTTP API's POST body (``POST /v1/videos``, ``/v1/images/generations``)."""

    v: Literal[1] = VERSION
    kind: Literal["submit_job"] = "submit_job"
    client_id: str = Field(pattern=AGENT_NAME_PATTERN, description="the client, as it signs and as its reply topic names it")
    request_key: str = Field(pattern=REQUEST_ID_PATTERN, description="the client's name for the job; a repeat with "
                                                                      "the same key is answered, never run twice")
    endpoint: Literal["videos", "images/generations"] = Field(description="the HTTP endpoint whose body ``job`` is")
    job: JsonObject = Field(description="the job's fields, as the HTTP API takes them")


class JobUpdate(_Model):
    """A service -> the client that submitted a job over MQTT: where the job stands (as GET /v1/videos/{id})."""

    v: Literal[1] = VERSION
    kind: Literal["job_update"] = "job_update"
    request_key: str = Field(pattern=REQUEST_ID_PATTERN, description="the client's name for the job")
    job: JsonObject = Field(description="the job as the HTTP API shows it (id, status, progress, error, ...)")
    content_url: str | None = Field(default=None, description="where to fetch the output once completed")
    b64_json: str | None = Field(default=None, max_length=700_000, description="a small image output, inline")
    preview_jpeg_b64: str | None = Field(default=None, max_length=PREVIEW_B64_CHARS,
                                         description="the job's latest preview (a JPEG, base64) when it is new")


Message: TypeAlias = Annotated[
    Status | Heartbeat | RunStage | StageDone | StageFailed | Preview | GrantRequest | Grant | Landed | Delivered | Ack | Fence
    | Shutdown | Cancel | ReplicaRestarting | CpuShare | AgentBirth | AgentOrder | AgentJob | SubmitJob | JobUpdate,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
KINDS: frozenset[str] = frozenset(
    model.model_fields["kind"].default
    for model in (
        Status, Heartbeat, RunStage, StageDone, StageFailed, Preview, GrantRequest, Grant, Landed, Delivered, Ack, Fence, Shutdown,
        Cancel, ReplicaRestarting, CpuShare, AgentBirth, AgentOrder, AgentJob, SubmitJob, JobUpdate,
    )
)


def encode(message: Message) -> bytes:
    """The message as compact UTF-8 JSON."""
    return message.model_dump_json().encode()


def decode(payload: bytes) -> Message:
    """Parse and validate one message; ControlError says what is wrong with it."""
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"control message is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ControlError(f"control message must be a JSON object, got {type(raw).__name__}")
    if raw.get("v") != VERSION:
        raise ControlError(f"control message has version {raw.get('v')!r}; this engine speaks version {VERSION}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ControlError(f"unknown control message kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'][1:]) or '<message>'}: {error['msg']}" for error in exc.errors()
        )
        raise ControlError(f"invalid {kind!r} message: {problems}") from exc
