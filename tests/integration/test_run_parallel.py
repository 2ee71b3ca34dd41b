"""A DiT node on several devices through `engine run` and `engine serve`: real rank processes (gloo over loopback),
real broker and Mooncake. The frames equal the monolithic pipeline's bit for bit with CFG parallel, Ulysses and both,
with previews on (`--preview`: every 2 steps, from rank 0 alone, one per step);
a rank killed mid-denoise fails its request naming the rank, the service starts the group again, nothing is left."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers, qwen_reference_image, reference_frames
from tests.integration.serve_helpers import start_service
from tests.integration.test_run_wan_experts import reference_frames as experts_reference_frames

pytestmark = pytest.mark.integration

TWO_CPUS = "place.devices=[cpu, cpu]"
CASES = {  # id -> graph, settings, the ranks of each split node
    "wan-t2v-cfg2-ulysses2": ("wan_t2v_parallel.yaml", (), {"transformer": 4}),
    "wan-i2v-ulysses2": ("wan_i2v.yaml", (f"nodes.transformer.{TWO_CPUS}", "nodes.transformer.parallel={ulysses: 2}"),
                         {"transformer": 2}),
    "wan-i2v-cfg2": ("wan_i2v.yaml", (f"nodes.transformer.{TWO_CPUS}", "nodes.transformer.parallel={cfg: 2}"),
                     {"transformer": 2}),
    "wan22-t2v-experts-both-split": ("wan22_t2v_experts.yaml", (
        f"nodes.dit_high.{TWO_CPUS}", "nodes.dit_high.parallel={cfg: 2}",
        f"nodes.dit_low.{TWO_CPUS}", "nodes.dit_low.parallel={ulysses: 2}"), {"dit_high": 2, "dit_low": 2}),
    "qwen-t2i-cfg2": ("qwen_image_t2i.yaml", (f"nodes.transformer.{TWO_CPUS}", "nodes.transformer.parallel={cfg: 2}"),
                      {"transformer": 2}),
}


def expected_output(graph: str, request: dict) -> np.ndarray:
    if graph.startswith("qwen"):
        return qwen_reference_image("t2i", request)
    if graph.startswith("wan22"):
        return experts_reference_frames("t2v_experts", request)
    return reference_frames("i2v" if "i2v" in graph else "t2v", json.dumps(request, sort_keys=True))


@pytest.mark.parametrize("case", list(CASES))
def test_a_split_dit_equals_the_pipeline(case, tmp_path):
    graph, settings, split = CASES[case]
    run = engine_run(graph, tmp_path / "out", *settings, extra=("--preview", str(tmp_path / "previews")))
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    report = run.report
    assert [r["state"] for r in report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    previews = [Path(path).name for path in report["requests"][0]["previews"]]
    assert [int(name.rsplit("step", 1)[1].removesuffix(".jpg")) for name in previews] == \
        list(range(2, request["steps"] + 1, 2)), previews
    output, expected = np.load(run.out / "r1.npy"), expected_output(graph, request)
    assert output.shape == expected.shape
    assert np.array_equal(output, expected), f"max abs difference {np.abs(output - expected).max()}"
    # Every rank took part: each split node's rank 0 joined its group, and every follower said it was ready.
    logs = "".join(p.read_text(errors="replace") for p in (run.out / "deploy").glob("*.log"))
    for node, ranks in split.items():
        assert f"{node}[0]" in logs and logs.count("group of") == len(split)
        for rank in range(1, ranks):
            assert f"rank {rank} of {node}[0] ready on cpu" in logs, logs[-3000:]
    assert live_workers(run.out) == [], "a rank outlived the run"


def group_pids(rank0: int) -> list[int]:
    """The follower ranks of the worker ``rank0`` (its children running engine.worker.rank)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == rank0 and b"engine.worker.rank" in cmdline and stat[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def test_a_killed_rank_fails_its_request_naming_it_and_the_service_starts_the_group_again(tmp_path):
    served = start_service("wan_t2v_parallel.yaml", tmp_path / "state", extra=("--no-mqtt", "--save-frames"))
    try:
        body = {"prompt": "a job whose rank dies", "seed": 3, "num_inference_steps": 400, "height": 48, "width": 64,
                "num_frames": 9}
        job_id = httpx.post(f"{served.url}/v1/videos", json=body, timeout=60).json()["id"]
        deadline = time.monotonic() + 120
        while not (busy := [r for r in replicas(served) if r["node"] == "transformer" and r["stage"] == "denoise"]):
            assert time.monotonic() < deadline, "the transformer never started denoising"
            time.sleep(0.05)
        followers = group_pids(busy[0]["pid"])
        assert len(followers) == 3, followers
        os.kill(followers[1], signal.SIGKILL)
        killed_at = time.monotonic()

        failed = served.wait_for(job_id, timeout_s=60)
        assert time.monotonic() - killed_at < 5, "the request outlived its dead rank by 5 s"
        assert failed["status"] == "failed", failed
        assert "rank 2 of transformer[0] on cpu killed by SIGKILL" in failed["error"]["message"], failed["error"]

        # The group comes back as a whole (new rank 0, new followers) and computes exactly again.
        deadline = time.monotonic() + 180
        while not (back := [r for r in replicas(served) if r["node"] == "transformer" and r["state"] == "ready"
                            and r["pid"] != busy[0]["pid"]]):
            assert time.monotonic() < deadline, "the group did not come back"
            time.sleep(0.2)
        assert len(group_pids(back[0]["pid"])) == 3 and not set(group_pids(back[0]["pid"])) & set(followers)
        again = {**body, "prompt": "after the group came back", "num_inference_steps": 4}
        job_id = httpx.post(f"{served.url}/v1/videos", json=again, timeout=60).json()["id"]
        done = served.wait_for(job_id)
        assert done["status"] == "completed", done.get("error")
        outputs = served.state / "outputs"
        request = json.loads((outputs / f"{job_id}.json").read_text())["request"]
        assert np.array_equal(np.load(outputs / f"{job_id}.npy"), reference_frames("t2v", json.dumps(request, sort_keys=True)))
    finally:
        code = served.stop()
    assert code == 0, served.log_text()[-5000:]
    assert live_workers(served.state / "outputs") == [], "a rank outlived the service"


def replicas(served) -> list[dict]:
    return httpx.get(f"{served.url}/v1/service", timeout=30).json()["state"]["replicas"]
