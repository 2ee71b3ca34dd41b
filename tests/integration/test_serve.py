"""``engine serve`` for real: its own process with uvicorn, a real HTTP client, real workers, Mooncake edges and a
real broker. One deployment of the two-DiT T2V graph (embedded mosquitto) serves most tests; an image-edit
deployment takes multipart edits; a three-node deployment on the embedded amqtt, one job at a time, is restarted
with jobs queued."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.control.client import ControlClient
from engine.control.messages import JobUpdate, SubmitJob
from engine.stream.fmp4 import to_levels
from tests.hostile_bodies import image_bodies, json_bodies
from tests.integration.engine_run import reference_frames
from tests.integration.serve_helpers import REPO, Served, start_service
from tests.stream_support import decode, fragment_cuts, frames_at_each_cut, level_error

pytestmark = pytest.mark.integration

QUEUE_SIZE = 24
LIMITS = ("limits.height=128", "limits.width=160", "limits.num_frames=17")  # room for jobs that take a while
LONG = {"prompt": "a long job", "num_inference_steps": 1000, "height": 128, "width": 160, "num_frames": 17}  # ~1 min


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Served:
    served = start_service("wan_t2v_two_dit.yaml", tmp_path_factory.mktemp("wan") / "state", *LIMITS,
                           extra=("--queue-size", str(QUEUE_SIZE), "--save-frames"))
    yield served
    assert served.stop() == 0, served.log_text()[-3000:]
    assert "Traceback" not in served.log_text(), served.log_text()[-5000:]


def post(served: Served, body: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/videos", json=body, timeout=60, **kwargs)


def statuses(served: Served) -> dict[str, str]:
    jobs = httpx.get(f"{served.url}/v1/videos", params={"limit": 100}, timeout=30).json()["data"]
    return {job["id"]: job["status"] for job in jobs}


def cancel_all(served: Served) -> None:
    for job_id, status in statuses(served).items():
        if status in ("queued", "in_progress"):
            httpx.delete(f"{served.url}/v1/videos/{job_id}", timeout=30)


# -- bodies ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"prompt": "x", "width": "wide"}, 422, "width"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "steps": 3}, 422, "steps"),  # the API calls it num_inference_steps
    ({"prompt": "x", "num_frames": 10}, 422, "num_frames"),  # 4k+1 frames
    ({"prompt": "x", "height": 256}, 422, "height"),  # over the edge buffers the service sized
    ({"prompt": "x", "size": "64x48", "width": 32}, 422, "size"),
    ({"prompt": "x", "model": "sora-2"}, 404, "model"),
    ({"prompt": "x" * (10 << 20)}, 422, "prompt"),  # a 10 MB prompt
    ({}, 422, "prompt"),
])
def test_malformed_bodies_get_4xx_naming_the_field(wan, body, status, field):
    answer = post(wan, body)
    assert answer.status_code == status, answer.text[:500]
    error = answer.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_broken_json_a_broken_image_and_a_file_where_none_is_wanted(wan):
    broken = httpx.post(f"{wan.url}/v1/videos", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
    listed = httpx.post(f"{wan.url}/v1/videos", json=["a", "list"])
    assert listed.status_code == 422 and "JSON object" in listed.json()["error"]["message"]
    image = httpx.post(f"{wan.url}/v1/videos", data={"prompt": "x"},
                       files={"input_reference": ("x.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")})
    assert image.status_code == 422 and image.json()["error"]["param"] == "input_reference"
    huge = httpx.post(f"{wan.url}/v1/videos", content=b"x" * (33 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    wrong_endpoint = httpx.post(f"{wan.url}/v1/images/generations", json={"prompt": "x"})
    assert wrong_endpoint.status_code == 404 and "/v1/videos" in wrong_endpoint.json()["error"]["message"]
    assert "Traceback" not in wan.log_text()


def test_hostile_bodies_get_a_4xx_naming_the_problem_and_a_normal_job_completes_after(wan):
    with httpx.Client(base_url=wan.url, timeout=60) as client:
        for hostile in json_bodies():
            hostile.check(client.post("/v1/videos", **hostile.send))
        for query, param in (({"limit": "abc"}, "limit"), ({"limit": 0}, "limit"), ({"order": "sideways"}, "order")):
            refused = client.get("/v1/videos", params=query)
            assert refused.status_code == 422 and refused.json()["error"]["param"] == param, refused.text
        unknown = client.get("/v1/no-such-thing")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        after = client.post("/v1/videos", json={"prompt": "a normal job after them"}).json()
    assert wan.wait_for(after["id"])["status"] == "completed"
    assert "Traceback" not in wan.log_text() and "ExceptionGroup" not in wan.log_text()


# -- jobs -----------------------------------------------------------------------------------------------------


def test_twenty_concurrent_jobs_match_the_monolithic_pipeline(wan):
    async def submit_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=wan.url, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/v1/videos", json={"prompt": f"scene {i}", "seed": 100 + i})
                                             for i in range(20)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        return [a.json() for a in answers]

    created = asyncio.run(submit_all())
    assert {job["status"] for job in created} == {"queued"} and len({job["id"] for job in created}) == 20
    done = [wan.wait_for(job["id"]) for job in created]
    assert [job["status"] for job in done] == ["completed"] * 20, [job["error"] for job in done]
    assert all(job["progress"] == 100 for job in done)

    outputs = wan.state / "outputs"
    for job in done:
        request = json.loads((outputs / f"{job['id']}.json").read_text())["request"]
        frames = np.load(outputs / f"{job['id']}.npy")
        expected = reference_frames("t2v", json.dumps(request, sort_keys=True))
        assert np.array_equal(frames, expected), f"{job['id']}: max abs difference {np.abs(frames - expected).max()}"
    video = httpx.get(f"{wan.url}/v1/videos/{done[0]['id']}/content", timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content == (outputs / f"{done[0]['id']}.mp4").read_bytes()
    head = httpx.get(f"{wan.url}/v1/videos/{done[0]['id']}/content", headers={"Range": "bytes=0-99"}, timeout=30)
    assert head.status_code == 206 and head.content == video.content[:100]


def test_progress_and_previews_stream_as_server_sent_events(wan):
    job = post(wan, {**LONG, "prompt": "watched", "num_inference_steps": 200, "cache": "teacache:0.5",
                     "preview_every": 40}).json()
    named = []  # (event name, data) in the order they came
    with httpx.stream("GET", f"{wan.url}/v1/videos/{job['id']}/events", timeout=120) as stream:
        name = "message"
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                named.append((name, json.loads(line[len("data: "):])))
    events = [data for name, data in named if name != "preview"]
    progress = [event["progress"] for event in events]
    assert events[-1]["status"] == "completed" and progress[-1] == 100
    assert progress == sorted(progress) and len(set(progress)) > 2, progress  # it moved step by step
    assert "in_progress" in {event["status"] for event in events}
    # The job's step caching, as the node's DiT loop reported it: every step's two passes run or skipped.
    cached = events[-1]["step_cache"]["denoise"]
    assert cached["method"] == "teacache" and cached["passes_run"] + cached["passes_skipped"] == 2 * 200
    assert cached["passes_skipped"] > 0
    # Previews every 40 steps, during the denoising: each before the job's end, a JPEG of the size it states.
    previews = [(index, data) for index, (name, data) in enumerate(named) if name == "preview"]
    assert len(previews) >= 2 and all(index < len(named) - 1 for index, _ in previews), [d["step"] for _, d in previews]
    assert {data["step"] for _, data in previews} <= {40, 80, 120, 160, 200}
    for _, data in previews:
        assert data["stage"] == "denoise" and data["total_steps"] == 200
        head, encoded = data["image"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            assert image.format == "JPEG" and image.size == (data["width"], data["height"])
    assert events[-1]["preview"]["step"] >= previews[-1][1]["step"]


def test_cancel_a_queued_and_a_running_job(wan):
    created = [post(wan, LONG).json()["id"] for _ in range(6)]
    deadline = time.monotonic() + 60
    while "in_progress" not in set(statuses(wan)[i] for i in created):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    now = statuses(wan)
    running = next(i for i in created if now[i] == "in_progress")
    queued = next(i for i in reversed(created) if now[i] == "queued")

    cancelled = httpx.delete(f"{wan.url}/v1/videos/{queued}", timeout=30).json()
    assert cancelled["status"] == "cancelled"

    asked = time.time()
    assert httpx.delete(f"{wan.url}/v1/videos/{running}", timeout=30).json()["status"] == "cancelled"
    stopped = _logged_at(wan, rf"request {running} failed: dropped: cancelled by the client", timeout_s=30)
    assert stopped - asked < 10, "the running job was not stopped at its next step"

    cancel_all(wan)
    assert queued not in wan.worker_logs(), "the queued job reached a worker"
    assert all(wan.wait_for(i)["status"] == "cancelled" for i in created)
    # Its slots were freed: a new job runs through every node.
    assert wan.wait_for(post(wan, {"prompt": "after"}).json()["id"])["status"] == "completed"
    again = httpx.delete(f"{wan.url}/v1/videos/{running}", timeout=30).json()
    assert again == {"id": running, "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{wan.url}/v1/videos/{running}", timeout=30).status_code == 404


def _logged_at(served: Served, pattern: str, timeout_s: float) -> float:
    """When a worker logged a line matching ``pattern`` (its wall-clock timestamp)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, served.worker_logs(), re.MULTILINE)
        if found:
            return time.mktime(time.strptime(found.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(found.group(1)[20:]) / 1000
        time.sleep(0.1)
    raise AssertionError(f"no worker logged {pattern!r} within {timeout_s} s")


def test_a_full_queue_answers_429_with_retry_after(wan):
    answers = [post(wan, LONG) for _ in range(QUEUE_SIZE + 8)]
    try:
        codes = [a.status_code for a in answers]
        assert 429 in codes, codes
        first = codes.index(429)
        assert set(codes[:first]) == {200} and set(codes[first:]) == {429}
        assert int(answers[first].headers["retry-after"]) >= 1
        assert "queue is full" in answers[first].json()["error"]["message"]
        metrics = httpx.get(f"{wan.url}/metrics", timeout=30).text
        assert f"engine_queue_depth {QUEUE_SIZE}.0" in metrics
    finally:
        cancel_all(wan)


def test_models_health_and_metrics(wan):
    assert httpx.get(f"{wan.url}/v1/models").json()["data"][0]["id"] == "wan_t2v_two_dit"
    health = httpx.get(f"{wan.url}/health").json()
    assert health["status"] == "ok" and health["nodes"] == {"encoder": 1, "transformer": 2, "decoder": 1}
    metrics = httpx.get(f"{wan.url}/metrics").text
    for series in ('engine_replicas_up{node="transformer"} 2.0', 'engine_stage_seconds_count{stage="denoise"}',
                   'engine_edge_bytes_total{edge="phase1"}', 'engine_integrity_failures_total{edge="phase2"} 0.0',
                   "engine_retries_total 0.0", 'engine_dit_passes_total{result="run",stage="denoise"}'):
        assert series in metrics, series


def test_mqtt_submission_round_trip_on_mosquitto(wan):
    updates = asyncio.run(_mqtt_round_trip(wan))
    assert updates[-1].job["status"] == "completed" and updates[-1].content_url
    # The job's previews, each once and inline: at least its last (steps 12, every 4), a JPEG.
    inline = [update for update in updates if update.preview_jpeg_b64]
    assert inline and updates[-1].job["preview"]["step"] == 12
    assert Image.open(io.BytesIO(base64.b64decode(inline[-1].preview_jpeg_b64))).format == "JPEG"
    assert httpx.get(updates[-1].content_url, timeout=30).content[4:8] == b"ftyp"  # an MP4


async def _mqtt_round_trip(served: Served) -> list[JobUpdate]:
    """Submit one job over MQTT as the service's client; the updates until it ended. A repeat of the same
    request key is answered with the same job."""
    address, client_id, key, submit, reply = served.mqtt_client_settings()
    client = ControlClient(address, client_id=client_id, key=key)
    await client.connect()
    try:
        await client.subscribe(reply)
        job = SubmitJob(client_id=client_id, request_key="k1", endpoint="videos",
                        job={"prompt": "over mqtt", "seed": 5, "num_inference_steps": 12, "preview_every": 4})
        await client.publish(submit, job)
        updates: list[JobUpdate] = []
        while not updates or updates[-1].job["status"] not in ("completed", "failed", "rejected"):
            inbound = await client.receive(60)
            assert inbound is not None, f"no update within 60 s; got {updates}"
            assert isinstance(inbound.message, JobUpdate) and inbound.message.request_key == "k1"
            updates.append(inbound.message)
        await client.publish(submit, job)  # again: the same job, not a second run
        repeat = await client.receive(30)
        assert repeat is not None and repeat.message.job["id"] == updates[-1].job["id"]
        return updates
    finally:
        await client.close()


def test_a_forged_submission_gets_no_job(wan):
    before = len(statuses(wan))

    async def forged() -> None:
        address, client_id, _, submit, reply = wan.mqtt_client_settings()
        client = ControlClient(address, client_id=client_id, key=b"k" * 32)
        await client.connect()
        try:
            await client.subscribe(reply)
            await client.publish(submit, SubmitJob(client_id=client_id, request_key="f1", endpoint="videos",
                                                   job={"prompt": "forged"}))
            assert await client.receive(3) is None
        finally:
            await client.close()

    asyncio.run(forged())
    assert len(statuses(wan)) == before


# -- image edits ----------------------------------------------------------------------------------------------


def test_an_image_edit_through_multipart(tmp_path):
    served = start_service("qwen_image_edit_single.yaml", tmp_path / "state", extra=("--no-mqtt",))
    try:
        picture = (REPO / "graphs" / "assets" / "first_frame.png").read_bytes()
        answer = httpx.post(f"{served.url}/v1/images/edits", data={"prompt": "make the sky stormy", "seed": "7"},
                            files={"image": ("frame.png", picture, "image/png")}, timeout=120)
        assert answer.status_code == 200, answer.text[:1000]
        body = answer.json()
        image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert image.format == "PNG" and image.size == (64, 64)
        by_url = httpx.post(f"{served.url}/v1/images/edits", timeout=120, files={"image": ("f.png", picture, "image/png")},
                            data={"prompt": "make the sky stormy", "seed": "7", "response_format": "url"}).json()
        same = httpx.get(served.url + by_url["data"][0]["url"], timeout=30)
        assert same.content == base64.b64decode(body["data"][0]["b64_json"])  # same seed, same image
        missing = httpx.post(f"{served.url}/v1/images/edits", data={"prompt": "x"}, timeout=30)
        assert missing.status_code == 422 and missing.json()["error"]["param"] == "image"
        for hostile in image_bodies("image", {"prompt": "make the sky stormy"}):
            hostile.check(httpx.post(f"{served.url}/v1/images/edits", timeout=60, **hostile.send))
        # No refused request left its upload: only the two edits' images are there.
        assert sorted(p.stem for p in (served.state / "uploads").iterdir()) == sorted([body["id"], by_url["id"]])
        again = httpx.post(f"{served.url}/v1/images/edits", data={"prompt": "make the sky stormy", "seed": "7"},
                           files={"image": ("frame.png", picture, "image/png")}, timeout=120)
        assert again.json()["data"][0]["b64_json"] == body["data"][0]["b64_json"]
    finally:
        assert served.stop() == 0
    assert "Traceback" not in served.log_text()


# -- restart --------------------------------------------------------------------------------------------------


def test_a_restart_runs_the_jobs_left_queued_on_amqtt(tmp_path):
    state = tmp_path / "state"
    one_at_a_time = ("broker=embedded:amqtt", "edges.0.slots=1", "edges.1.slots=1", *LIMITS)
    served = start_service("wan_t2v.yaml", state, *one_at_a_time, extra=("--grace-s", "1"))
    updates = asyncio.run(_mqtt_round_trip(served))
    assert updates[-1].job["status"] == "completed" and "progress" in updates[0].job

    running = post(served, LONG).json()["id"]
    served.wait_for(running, statuses=("in_progress",))
    waiting = [post(served, {"prompt": f"left {i}", "seed": i}).json()["id"] for i in range(3)]
    assert {served.wait_for(i, statuses=("queued",))["status"] for i in waiting} == {"queued"}
    watched: list[str] = []
    watcher = threading.Thread(target=lambda: watched.extend(
        httpx.get(f"{served.url}/v1/videos/{waiting[0]}/events", timeout=120).text.splitlines()))
    watcher.start()  # a client follows a job that stays queued: the stop must not wait on it
    time.sleep(0.5)
    assert served.stop() == 0
    watcher.join(timeout=10)
    assert not watcher.is_alive() and any('"status": "queued"' in line for line in watched)
    interrupted = served_job(state, running)
    assert interrupted["status"] == "failed" and interrupted["error_code"] == "interrupted"

    again = start_service("wan_t2v.yaml", state, *one_at_a_time)
    try:
        assert [again.wait_for(i)["status"] for i in waiting] == ["completed"] * 3
        shown = httpx.get(f"{again.url}/v1/videos/{running}").json()
        assert shown["status"] == "failed" and shown["error"]["code"] == "interrupted"
    finally:
        assert again.stop() == 0


def test_a_killed_worker_is_started_again_and_its_job_completes(tmp_path):
    """kill -9 of the only transformer worker mid-job: the service starts it again and the job reruns on it."""
    served = start_service("wan_t2v.yaml", tmp_path / "state", *LIMITS, extra=("--no-mqtt", "--save-frames"))
    try:
        body = {**LONG, "prompt": "a job whose worker dies", "seed": 3, "num_inference_steps": 150}
        job_id = post(served, body).json()["id"]
        deadline = time.monotonic() + 120
        while not (busy := [r for r in service_replicas(served) if r["node"] == "transformer" and r["stage"] == "denoise"]):
            assert time.monotonic() < deadline, "the transformer never started denoising"
            time.sleep(0.05)
        os.kill(busy[0]["pid"], signal.SIGKILL)

        done = served.wait_for(job_id)
        assert done["status"] == "completed", done["error"]
        outputs = served.state / "outputs"
        request = json.loads((outputs / f"{job_id}.json").read_text())["request"]
        assert np.array_equal(np.load(outputs / f"{job_id}.npy"), reference_frames("t2v", json.dumps(request, sort_keys=True)))
        (again,) = [r for r in service_replicas(served) if r["node"] == "transformer"]
        assert again["pid"] != busy[0]["pid"] and again["state"] in ("ready", "busy")
        assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
        log = served.log_text()
        assert "transformer[0]: starting it again in 1 s (restart 1)" in log and "transformer[0] is back" in log, log[-3000:]
        assert "SIGKILL" in log or "dead" in log
        assert (outputs / "deploy" / "transformer-0.previous.log").is_file()  # the killed process's log is kept
    finally:
        code = served.stop()
    assert code == 0 and "Traceback" not in served.log_text(), served.log_text()[-5000:]


def service_replicas(served: Served) -> list[dict]:
    return httpx.get(f"{served.url}/v1/service", timeout=30).json()["state"]["replicas"]


def served_job(state: Path, job_id: str) -> dict:
    import sqlite3

    with sqlite3.connect(state / "jobs.sqlite") as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


# -- streamed video -------------------------------------------------------------------------------------------

STREAMED = {"prompt": "streamed", "num_inference_steps": 2, "height": 128, "width": 160, "num_frames": 17, "seed": 7}


class StreamReader(threading.Thread):
    """GET ``content?stream=true`` on its own thread: what arrived and when; ``pause_s`` between reads (a slow
    client), or ``stop_after`` pieces (a client that goes away)."""

    def __init__(self, served: Served, job_id: str, *, pause_s: float = 0.0, stop_after: int | None = None,
                 piece_bytes: int | None = None):
        super().__init__(daemon=True)
        self.url = f"{served.url}/v1/videos/{job_id}/content"
        self.pause_s, self.stop_after, self.piece_bytes = pause_s, stop_after, piece_bytes
        self.pieces: list[tuple[float, bytes]] = []
        self.status = 0
        self.first_fragment_at: float | None = None  #: when what arrived first held a whole fragment
        self.file_when_first_fragment: bytes | None = None  #: the stream file on disk at that moment
        self.stream_file = served.state / "outputs" / f"{job_id}.stream.mp4"

    def run(self) -> None:
        with httpx.stream("GET", self.url, params={"stream": "true"}, timeout=120) as answer:
            self.status = answer.status_code
            for piece in answer.iter_bytes(self.piece_bytes):
                self.pieces.append((time.time(), piece))
                if self.first_fragment_at is None and fragment_cuts(self.data):
                    self.first_fragment_at = time.time()
                    self.file_when_first_fragment = self.stream_file.read_bytes()
                if self.stop_after is not None and len(self.pieces) >= self.stop_after:
                    return
                time.sleep(self.pause_s)

    @property
    def data(self) -> bytes:
        return b"".join(piece for _, piece in self.pieces)


def test_a_video_streams_while_it_is_decoded_to_slow_and_leaving_clients_alike(wan):
    """The stream's first fragment reaches the client while the decoder still decodes; the stream plays at every
    fragment boundary and shows the final file's frames; a client that reads slowly or goes away changes nothing
    for the job."""
    job = post(wan, STREAMED).json()
    readers = [StreamReader(wan, job["id"]), StreamReader(wan, job["id"], pause_s=0.2, piece_bytes=4096),
               StreamReader(wan, job["id"], stop_after=1)]
    for reader in readers:
        reader.start()
    done = wan.wait_for(job["id"])
    finished_at = time.time()
    for reader in readers:
        reader.join(120)
    fast, slow, leaving = readers
    assert done["status"] == "completed" and [r.status for r in readers] == [200] * 3

    # 1. Early: the first fragment arrived while the decoder had not finished (its file not ended yet, fewer
    #    frames in it than asked for), before the decoder logged its end.
    outputs = wan.state / "outputs"
    stream = fast.data
    assert fast.file_when_first_fragment is not None and b"mfra" not in fast.file_when_first_fragment
    assert len(decode(fast.file_when_first_fragment[:fragment_cuts(fast.file_when_first_fragment)[-1]])) < 17
    decoded_at = _logged_at(wan, rf"request {job['id']}: vae_decode took", timeout_s=10)
    assert fast.first_fragment_at < decoded_at + 0.001, (fast.first_fragment_at, decoded_at)

    # 2. Whole: every client that stayed got the same stream, playable after every fragment (one per latent frame:
    #    1, then 4 frames); its file is gone, superseded by the final video.
    assert slow.data == stream and leaving.data == stream[:len(leaving.data)]
    assert not (outputs / f"{job['id']}.stream.mp4").exists()
    assert frames_at_each_cut(stream) == [1, 5, 9, 13, 17]
    exact = np.load(outputs / f"{job['id']}.npy")[0]
    final = decode((outputs / f"{job['id']}.mp4").read_bytes())
    streamed = decode(stream)
    assert level_error(streamed, final) < 4.0  # both H.264 of the same frames (tests/unit/test_stream_fmp4.py)
    assert level_error(streamed, to_levels(exact)) <= level_error(final, to_levels(exact)) + 1.0

    # 3. The slow client was still reading when the job had completed; the leaving one read one piece. The job is
    #    unchanged (its frames are the pipeline's with streaming on: test_twenty_concurrent_jobs_match_...).
    assert slow.pieces[-1][0] > finished_at and len(leaving.pieces) == 1
    assert httpx.get(f"{wan.url}/v1/videos/{job['id']}/content", timeout=30).content == (outputs / f"{job['id']}.mp4").read_bytes()


def test_cancel_while_streaming_stops_the_decoder_and_ends_the_stream(wan):
    job = post(wan, {**STREAMED, "prompt": "cancelled while streamed"}).json()
    reader = StreamReader(wan, job["id"])
    reader.start()
    deadline = time.monotonic() + 120
    while reader.first_fragment_at is None:  # the decoder is decoding
        assert reader.is_alive() and time.monotonic() < deadline, "no fragment arrived"
        time.sleep(0.02)
    asked = time.time()
    assert httpx.delete(f"{wan.url}/v1/videos/{job['id']}", timeout=30).json()["status"] == "cancelled"
    reader.join(30)
    assert not reader.is_alive() and reader.status == 200, "the stream did not end with the job"
    stopped = _logged_at(wan, rf"request {job['id']} failed: dropped: cancelled by the client", timeout_s=30)
    assert stopped - asked < 10
    # The decoder stopped between chunks: the stream file holds fewer frames than asked for and still plays; what
    # the client got is a playable prefix of it.
    stream = (wan.state / "outputs" / f"{job['id']}.stream.mp4").read_bytes()
    shown = frames_at_each_cut(stream)
    assert shown and shown[-1] < 17 and len(decode(stream)) == shown[-1]
    assert stream.startswith(reader.data) and frames_at_each_cut(reader.data)
    assert not (wan.state / "outputs" / f"{job['id']}.mp4").exists()
    answer = httpx.get(f"{wan.url}/v1/videos/{job['id']}/content", params={"stream": "true"}, timeout=30)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "not_completed"
