"""What the service's page reads, without processes or sockets: the replicas' snapshot, every job followed, the
graph as /v1/service describes it, the event stream's first events, and the page's files served as modules."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from fastapi.testclient import TestClient

from engine.control.messages import Heartbeat, Status
from engine.controller.tracker import State, TrackedRequest
from engine.serve.bodies import VideoBody
from engine.serve.http import ApiOptions, create_app
from engine.serve.page import describe, events
from engine.serve.service import ReplicaSnapshot, Service
from nodes.wan.family import WanRequest
from tests.unit.serve_support import service_of


def announce(service: Service, node: str, replica: int, state: str, **fields) -> None:
    service.controller.fleet.observe(Status(node=node, replica=replica, state=state, pid=100 + replica, host="h", **fields))


def ready(service: Service) -> None:
    for node, replica in service.controller.fleet.replicas:
        announce(service, node, replica, "ready", receive_edges={}, param_bytes=1, load_s=0.1)


def test_replicas_show_starting_ready_busy_with_stage_and_step_and_down(tmp_path):
    service = service_of(tmp_path)
    assert {r.state for r in service.replicas()} == {"starting"}
    ready(service)
    running = TrackedRequest("video_1", WanRequest(prompt="x", steps=8), time.monotonic(), state=State.RUNNING,
                             segment=1, replica_of={0: 0, 1: 1, 2: 0}, steps={("transformer", "denoise"): (3, 8)})
    service.scheduler = SimpleNamespace(requests=[running])  # type: ignore[assignment]
    service.controller.view.heartbeat(Heartbeat(node="transformer", replica=1, seq=1, request_id="video_1", stage="denoise",
                                                step=3, total_steps=8, requests_done=0, rss_bytes=1, rejected=0, time=0.0))
    announce(service, "decoder", 0, "failed", detail="out of memory")

    snapshot = {(r.node, r.replica): r for r in service.replicas()}
    assert snapshot[("transformer", 1)] == ReplicaSnapshot("transformer", 1, "busy", 101, None, "denoise", "video_1", 3, 8)
    assert snapshot[("transformer", 0)] == ReplicaSnapshot("transformer", 0, "ready", 100, None, None, None, 0, 0)
    assert snapshot[("decoder", 0)].state == "down" and snapshot[("decoder", 0)].down == "failed: out of memory"


def test_follow_all_sees_every_job_change_of_every_job(tmp_path):
    service = service_of(tmp_path)

    async def scenario() -> list[tuple[str, str]]:
        follow = service.follow_all()
        first_change = asyncio.ensure_future(anext(follow))
        await asyncio.sleep(0)  # following from here on
        first = service.accept(service.new_id("video"), "video", VideoBody, {"prompt": "one"})
        seen = [(await first_change).params["prompt"]]
        service.accept(service.new_id("video"), "video", VideoBody, {"prompt": "two"})
        seen.append((await anext(follow)).params["prompt"])
        service.cancel(first.id)
        cancelled = await anext(follow)
        await follow.aclose()
        return [*seen, (cancelled.params["prompt"], cancelled.status)]

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["one", "two", ("one", "cancelled")]
    assert not service._watchers, "a follower that stopped is forgotten"


def test_the_graph_as_planned_with_bytes_at_the_default_request(tmp_path):
    service = service_of(tmp_path)
    described = describe(service)
    assert [(n["name"], n["replicas"], n["host"], n["device"]) for n in described["nodes"]] == [
        ("encoder", 1, "local", "cpu"), ("transformer", 2, "local", "cpu"), ("decoder", 1, "local", "cpu")]
    phase1, phase2 = described["edges"]
    assert (phase2["from"], phase2["to"], phase2["transport"], phase2["tensors"]) == ("transformer", "decoder", "mooncake", ["latents"])
    assert phase2["bytes_per_request"] == 16 * 3 * 6 * 8 * 4  # latents at 9 frames of 48x64, float32
    assert phase1["bytes_per_request"] == 2 * 512 * 4096 * 4  # prompt and negative embeddings of umT5-XXL
    assert described["endpoint"] == "/v1/videos" and described["image_field"] is None
    assert described["defaults"] == {"width": 64, "height": 48, "num_frames": 9, "steps": 4, "seed": 0,
                                     "negative_prompt": "blurry, distorted"}
    # The form's ranges: the family's bounds, the sizes at most what the edge buffers hold (the graph's limits).
    assert described["bounds"] == {"width": {"min": 16, "max": 64}, "height": {"min": 16, "max": 48},
                                   "num_frames": {"min": 1, "max": 9}, "steps": {"min": 1, "max": 1000}}


def test_events_start_with_the_jobs_and_the_state_then_follow_changes(tmp_path):
    service = service_of(tmp_path)
    service.accept(service.new_id("video"), "video", VideoBody, {"prompt": "before"})

    async def scenario() -> list[dict[str, str]]:
        stream = events(service)
        received = [await anext(stream), await anext(stream)]
        service.accept(service.new_id("video"), "video", VideoBody, {"prompt": "after"})
        received.append(await anext(stream))
        await stream.aclose()
        return received

    jobs, state, job = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert jobs["event"] == "jobs" and '"prompt": "before"' in jobs["data"]
    assert state["event"] == "state" and '"status": "starting"' in state["data"] and '"queued": 1' in state["data"]
    assert job["event"] == "job" and '"prompt": "after"' in job["data"]


def test_the_page_is_public_its_modules_are_javascript_and_v1_service_wants_the_token(tmp_path):
    client = TestClient(create_app(service_of(tmp_path), ApiOptions(token="secret")))
    assert "<script type=\"module\" src=\"/page/app.js\">" in client.get("/").text
    for name in ("app.js", "api.js", "form.js", "graph.js", "jobs.js", "stream.js"):
        answer = client.get(f"/page/{name}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/javascript"), name
    assert client.get("/page/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/v1/service").status_code == 401
    described = client.get("/v1/service", headers={"Authorization": "Bearer secret"}).json()
    assert described["state"]["status"] == "starting" and len(described["state"]["replicas"]) == 4
