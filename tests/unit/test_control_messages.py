"""Control messages: round trips, the discriminated union, and clear errors for every kind of bad payload."""

from __future__ import annotations

import json

import pytest

from engine.control.messages import (
    KINDS,
    Ack,
    AgentBirth,
    AgentJob,
    AgentOrder,
    Delivered,
    DeviceInfo,
    EdgeStats,
    Fence,
    Grant,
    GrantRequest,
    Heartbeat,
    Landed,
    Preview,
    ReplicaRef,
    ReplicaRestarting,
    CpuShare,
    RunStage,
    Shutdown,
    Cancel,
    JobUpdate,
    SubmitJob,
    StageDone,
    StageFailed,
    Status,
    decode,
    encode,
)
from engine.errors import ControlError

SENDER = ReplicaRef(node="encoder", replica=0)
RECEIVER = ReplicaRef(node="transformer", replica=1)

EXAMPLES = [
    Status(node="transformer", replica=1, state="starting", pid=42, host="gpu-1"),
    Status(
        node="transformer",
        replica=1,
        state="ready",
        pid=42,
        host="gpu-1",
        receive_edges={"phase1": {"segment": "gpu-1:12345", "offset": 0, "slots": 2}},
        param_bytes=1 << 30,
        load_s=12.5,
    ),
    Status(node="decoder", replica=0, state="dead", pid=7, host="h", detail="connection lost"),
    Heartbeat(
        node="transformer", replica=0, seq=3, request_id="r1", stage="denoise", step=4, total_steps=50,
        requests_done=2, rss_bytes=10_000_000, rejected=0, time=1.7e9,
    ),
    Heartbeat(
        node="transformer", replica=0, seq=4, request_id=None, stage=None, step=0, total_steps=0,
        requests_done=3, rss_bytes=1, rejected=4, time=1.7e9,
    ),
    RunStage(
        request_id="r1", request={"prompt": "a cat", "seed": 0}, node="transformer", attempt=0, deadline_s=60,
        segment=1, send_to={"phase2": 0},
    ),
    StageDone(
        request_id="r1", node="transformer", replica=0, attempt=1, timings={"denoise": 3.5},
        edges={"phase2": EdgeStats(nbytes=1024, tensor_bytes=1000, seconds=0.01, digest="ab" * 16)}, outputs=[], peak_rss_bytes=2**30,
    ),
    StageFailed(
        request_id="r1", node="transformer", replica=0, attempt=0, stage="denoise", error_type="RuntimeError",
        error="CUDA out of memory", traceback_tail="File x, line 1", log_tail="loading...",
    ),
    Preview(request_id="r1", node="transformer", replica=0, attempt=0, stage="denoise", step=2, total_steps=4,
            width=256, height=64, jpeg_b64="/9j/4AAQ"),
    GrantRequest(request_id="r1", edge="phase1", attempt=0, sender=SENDER, nbytes=4096),
    Grant(request_id="r1", edge="phase1", attempt=0, receiver=RECEIVER, grant={"slot": 1, "generation": 5}, error=None),
    Grant(request_id="r1", edge="phase1", attempt=0, receiver=RECEIVER, grant=None, error="payload larger than a slot"),
    Delivered(request_id="r1", edge="phase1", attempt=0, delivery=0, sender=SENDER, manifest={"tensors": []},
              request={"prompt": "a cat", "seed": 0}),
    Ack(request_id="r1", edge="phase1", attempt=0, delivery=1, receiver=RECEIVER, ok=True, reason=None, tensors=[], retryable=True),
    Ack(request_id="r1", edge="phase1", attempt=0, delivery=1, receiver=RECEIVER, ok=False, reason="digest mismatch", tensors=["prompt_embeds"], retryable=True),
    Fence(request_id="r1", edge="phase1", attempt=0, sender=SENDER, grant={"slot": 1}, reason="write timed out"),
    Landed(request_id="r1", edge="phase1", attempt=0, sender=SENDER, slot=1, generation=2, ranges=[[0, 1 << 20], [1 << 20, 2 << 20]]),
    Shutdown(reason="run finished"),
    Cancel(request_id="video_1", reason="cancelled by the client"),
    ReplicaRestarting(node="transformer", replica=1),
    CpuShare(share=0.5),
    SubmitJob(client_id="cam-7", request_key="k1", endpoint="videos", job={"prompt": "a fox"}),
    JobUpdate(request_key="k1", job={"id": "video_1", "status": "queued"}),
    AgentBirth(agent="gpu1", state="online", version="0.1.0", address="10.0.0.11",
               devices=[DeviceInfo(name="cuda:0", total_bytes=80 << 30, free_bytes=None)], rdma_devices=["mlx5_0"],
               families=["wan"], models=["/models"], running=[], time=1.7e9),
    AgentOrder(order_id="transformer-0", run_id="run1", action="deploy", lease_s=10.0, workers=[{"node": "transformer"}]),
    AgentJob(agent="gpu1", order_id="transformer-0", run_id="run1", state="failed", detail="model outside --models",
             exited={}, log_tails={}),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_every_message_round_trips_to_its_own_type(message):
    decoded = decode(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_examples_cover_every_kind():
    assert {m.kind for m in EXAMPLES} == KINDS


def test_wire_format_is_json_with_version_and_kind():
    raw = json.loads(encode(Shutdown(reason="bye")))
    assert raw == {"v": 1, "kind": "shutdown", "reason": "bye"}


def test_messages_are_frozen():
    message = Shutdown(reason="bye")
    with pytest.raises(Exception, match="frozen"):
        message.reason = "other"  # type: ignore[misc]


def _payload(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x80\x04pickle", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (_payload(kind="shutdown", reason="x"), "version None"),
        (_payload(v=2, kind="shutdown", reason="x"), "version 2; this engine speaks version 1"),
        (_payload(v=1, kind="reboot"), "unknown control message kind 'reboot'; expected one of ack, "),
        (_payload(v=1, reason="x"), "unknown control message kind None"),
        (_payload(v=1, kind="shutdown"), "invalid 'shutdown' message: reason: Field required"),
        (_payload(v=1, kind="shutdown", reason="x", extra=1), "extra: Extra inputs are not permitted"),
        (_payload(v=1, kind="shutdown", reason=5), "reason: Input should be a valid string"),
        (
            _payload(v=1, kind="status", node="n", replica=-1, state="ready", pid=1, host="h"),
            "replica: Input should be greater than or equal to 0",
        ),
        (
            _payload(v=1, kind="status", node="n", replica=0, state="asleep", pid=1, host="h"),
            "state: Input should be 'starting'",
        ),
        (
            _payload(v=1, kind="status", node="n", replica=0, state="ready", pid=1, host="h"),
            "state 'ready' needs receive_edges, param_bytes and load_s",
        ),
        (
            _payload(v=1, kind="run_stage", request_id="r", request={}, node="n", attempt="0", deadline_s=1, send_to={}),
            "attempt: Input should be a valid integer",
        ),
        (
            _payload(
                v=1, kind="ack", request_id="r", edge="e", attempt=0, delivery=0, receiver={"node": "n", "replica": 0},
                ok=False, reason=None, tensors=[], retryable=True,
            ),
            "an ack has a reason exactly when ok is false",
        ),
        (
            _payload(
                v=1, kind="grant", request_id="r", edge="e", attempt=0, receiver={"node": "n", "replica": 0},
                grant={"slot": 0}, error="refused",
            ),
            "exactly one of grant (granted) and error (refused)",
        ),
        (
            _payload(
                v=1, kind="grant_request", request_id="r", edge="e", attempt=0, sender={"node": "n"}, nbytes=1
            ),
            "sender.replica: Field required",
        ),
        (
            _payload(v=1, kind="run_stage", request_id="../../../../tmp/x", request={}, node="n", attempt=0,
                     deadline_s=1, segment=0, send_to={}),
            "request_id: String should match pattern",
        ),
        (
            _payload(v=1, kind="stage_done", request_id="r1", node="../n", replica=0, attempt=0, timings={}, edges={},
                     outputs=[], peak_rss_bytes=0),
            "node: String should match pattern",
        ),
    ],
)
def test_invalid_payloads_are_rejected_with_the_reason(payload, expected):
    with pytest.raises(ControlError) as info:
        decode(payload)
    assert expected in str(info.value)


def test_required_fields_have_no_defaults():
    with pytest.raises(Exception, match="request_id"):
        RunStage(request={}, node="n", attempt=0, deadline_s=1, send_to={})  # type: ignore[call-arg]
    with pytest.raises(Exception, match="request_id"):
        Heartbeat(node="n", replica=0, seq=0, stage=None, step=0, total_steps=0, requests_done=0, rss_bytes=0, time=0)  # type: ignore[call-arg]
