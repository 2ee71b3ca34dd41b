"""Wan2.2 TI2V-5B's layout through `engine run`, with real processes, broker and Mooncake, on the tiny-ti2v preset:
text to video in the three-node T2V graph (encoder, transformer, decoder) equals WanPipeline with expand_timesteps bit
for bit, and image to video in graphs/wan22_ti2v.yaml equals WanImageToVideoPipeline with expand_timesteps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers, reference_frames

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("graph", "settings", "task", "edge", "nbytes"), [
    # latents [1, 48, 3, 6, 8] float32 from the transformer to the decoder
    ("wan_t2v.yaml", ("model.path=tiny-ti2v",), "t2v", "phase2", 48 * 3 * 6 * 8 * 4),
    # prompt and negative prompt embeddings [1, 512, 32] and one latent frame [1, 48, 1, 6, 8], float32, to the DiT
    ("wan22_ti2v.yaml", (), "ti2v", "phase1", 2 * 512 * 32 * 4 + 48 * 6 * 8 * 4),
], ids=["text_to_video", "image_to_video"])
def test_ti2v_on_three_nodes_matches_the_pipeline(tmp_path, graph, settings, task, edge, nbytes):
    run = engine_run(graph, tmp_path / "out", *settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["state"] for r in run.report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    frames = np.load(run.out / "r1.npy")
    assert frames.shape == (9, 48, 64, 3)
    assert np.array_equal(frames, reference_frames(task, json.dumps(request, sort_keys=True), "tiny-ti2v"))
    assert live_workers(run.out) == []
    assert run.report["requests"][0]["edges"][edge]["tensor_bytes"] == nbytes
