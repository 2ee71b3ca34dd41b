"""`engine run` end to end: real worker processes, a real broker (mosquitto and the embedded amqtt), real
Mooncake transfers; the frames equal the monolithic diffusers pipeline's, and no worker outlives the run."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers, mosquitto, reference_frames

pytestmark = pytest.mark.integration

LAYOUTS = {  # graph file -> nodes
    "wan_t2v_single.yaml": 1, "wan_t2v_shared_codec.yaml": 2, "wan_t2v.yaml": 3,
    "wan_i2v_single.yaml": 1, "wan_i2v_shared_codec.yaml": 2, "wan_i2v.yaml": 3,
}


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
@pytest.mark.parametrize("graph", list(LAYOUTS))
def test_run_matches_monolithic_pipeline(graph, broker, tmp_path):
    if broker == "mosquitto":
        with mosquitto(tmp_path) as url:
            run = engine_run(graph, tmp_path / "out", f"broker={url}")
    else:
        run = engine_run(graph, tmp_path / "out", "broker=embedded:amqtt")
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]

    report = run.report
    assert [r["state"] for r in report["requests"]] == ["done"]
    assert len({n["node"] for n in report["nodes"]}) == LAYOUTS[graph]
    # Every edge a request crossed moved exactly its payload, with a digest.
    for edge in report["requests"][0]["edges"].values():
        assert edge["nbytes"] > 0 and len(edge["digest"]) == 32

    request = json.loads((run.out / "r1.json").read_text())["request"]
    frames = np.load(run.out / "r1.npy")
    expected = reference_frames("i2v" if "i2v" in graph else "t2v", json.dumps(request, sort_keys=True))
    assert frames.shape == expected.shape
    assert np.array_equal(frames, expected), f"max abs difference {np.abs(frames - expected).max()}"

    with av.open(str(run.out / "r1.mp4")) as video:  # a playable H.264 video with every frame
        stream = video.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in video.decode(stream)) == request["num_frames"]

    assert live_workers(run.out) == [], "a worker process survived the run"
