"""`engine serve` with an elastic decoder (``replicas: {min: 1, max: 2}``), for real: a burst of jobs scales it out,
every job completes once with frames equal to the monolithic pipeline's, and once the burst is over it scales back
in, the drained replica's process stopped. Jobs are counted in the workers' own logs: none lost, none run twice."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from tests.integration.engine_run import reference_frames
from tests.integration.serve_helpers import Served, start_service

pytestmark = pytest.mark.integration

JOBS = 20
ELASTIC = ("nodes.decoder.replicas={min: 1, max: 2}", "scaling.window_s=1.5", "scaling.in_window_s=3",
           "scaling.cooldown_s=3", "limits.height=128", "limits.width=160", "limits.num_frames=17")
BODY = {"prompt": "a burst", "size": "160x128", "num_frames": 17, "num_inference_steps": 2}  # decoding takes the time


def metric(served: Served, name: str) -> dict[str, float]:
    """A family of the service's /metrics: its samples' labels (as text) -> value."""
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\{{.*?\}})? (\S+)$", text, re.M)}


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.2)


def test_a_burst_scales_the_decoder_out_and_back_in_losing_and_repeating_no_job(tmp_path):
    served = start_service("wan_t2v.yaml", tmp_path / "state", *ELASTIC, extra=("--no-mqtt", "--save-frames"))
    try:
        async def burst() -> list[str]:
            async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
                answers = await asyncio.gather(*(http.post("/v1/videos", json={**BODY, "seed": i}) for i in range(JOBS)))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            return [a.json()["id"] for a in answers]

        ids = asyncio.run(burst())
        wait_until(lambda: metric(served, "engine_replicas").get('{node="decoder"}') == 2, 120, "decoder scaled out")
        done = [served.wait_for(job_id) for job_id in ids]
        assert [job["status"] for job in done] == ["completed"] * JOBS, [job["error"] for job in done]

        # Back in once idle: the drained replica's process is told to stop, and does.
        wait_until(lambda: metric(served, "engine_replicas").get('{node="decoder"}') == 1, 60, "decoder scaled in")
        wait_until(lambda: "decoder[1] drained: stopping it" in served.log_text(), 30, "the drained replica stopped")
        events = metric(served, "engine_scale_events_total")
        assert events.get('{direction="out",node="decoder",reason="busy"}', 0) + events.get(
            '{direction="out",node="decoder",reason="queue"}', 0) == 1
        assert events['{direction="in",node="decoder",reason="idle"}'] == 1

        # Each job decoded exactly once, by one decoder or the other; both decoded some.
        deploy = served.state / "outputs" / "deploy"
        decoded = {replica: re.findall(r"request (video_\w+): vae_decode took", (deploy / f"decoder-{replica}.log").read_text())
                   for replica in (0, 1)}
        assert Counter(decoded[0] + decoded[1]) == Counter(set(ids)), "a job decoded twice or not at all"
        assert decoded[0] and decoded[1]

        # Frames equal the pipeline's, from each decoder.
        outputs = served.state / "outputs"
        for job_id in (decoded[0][0], decoded[1][0], decoded[1][-1]):
            request = json.loads((outputs / f"{job_id}.json").read_text())["request"]
            expected = reference_frames("t2v", json.dumps(request, sort_keys=True))
            assert np.array_equal(np.load(outputs / f"{job_id}.npy"), expected), job_id
    finally:
        code = served.stop()
    log = served.log_text()
    assert code == 0 and "Traceback" not in log, log[-5000:]
    assert re.search(r"scale out 'decoder': (busy|\d)", log) and "scale in 'decoder': busy" in log, log[-3000:]
    assert re.search(r"starting decoder\[1\] on local cpu: [\d.]+ GiB free for [\d.]+ [KM]iB", log), log[-3000:]
