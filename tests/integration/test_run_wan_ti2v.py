"""Wan2.2 TI2V-5B's layout through `engine run`, with real processes, broker and Mooncake, on the tiny-ti2v preset:
text to video in the three-node T2V graph (encoder, transformer, decoder) equals WanPipeline with expand_timesteps bit
for bit, and image to video in graphs/wan22_ti2v.yaml equals WanImageToVideoPipeline with expand_timesteps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers, reference_frames

pytestmark = pytest.mark.integration


def test_ti2v_text_to_video_on_three_nodes_matches_the_pipeline(tmp_path):
    run = engine_run("wan_t2v.yaml", tmp_path / "out", "model.path=tiny-ti2v")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["state"] for r in run.report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    frames = np.load(run.out / "r1.npy")
    assert frames.shape == (9, 48, 64, 3)
    assert np.array_equal(frames, reference_frames("t2v", json.dumps(request, sort_keys=True), "tiny-ti2v"))
    assert live_workers(run.out) == []
    # 48x64, 9 frames: latents [1, 48, 3, 6, 8] float32 from the transformer to the decoder
    assert run.report["requests"][0]["edges"]["phase2"]["tensor_bytes"] == 48 * 3 * 6 * 8 * 4


def test_ti2v_image_to_video_on_three_nodes_matches_the_pipeline(tmp_path):
    run = engine_run("wan22_ti2v.yaml", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["state"] for r in run.report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    frames = np.load(run.out / "r1.npy")
    assert frames.shape == (9, 48, 64, 3)
    assert np.array_equal(frames, reference_frames("ti2v", json.dumps(request, sort_keys=True), "tiny-ti2v"))
    assert live_workers(run.out) == []
    # 48x64: prompt and negative prompt embeddings [1, 512, 32] and one latent frame [1, 48, 1, 6, 8], float32
    assert run.report["requests"][0]["edges"]["phase1"]["tensor_bytes"] == 2 * 512 * 32 * 4 + 48 * 6 * 8 * 4
