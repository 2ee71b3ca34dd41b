"""Wan2.2 TI2V-5B's layout through `engine run`: the three-node T2V graph (encoder, transformer, decoder) on the
tiny-ti2v preset, with real processes, broker and Mooncake, equals WanPipeline with expand_timesteps bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers

pytestmark = pytest.mark.integration


def reference_frames(request: dict) -> np.ndarray:
    """WanPipeline on the same preset, the VAE in float32 as in the diffusers Wan examples."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    from engine.families import get_family

    source = get_family("wan").resolve_source("t2v", "tiny-ti2v")
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(source, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps
    return pipe(prompt=request["prompt"], negative_prompt=request["negative_prompt"], height=request["height"],
                width=request["width"], num_frames=request["num_frames"], num_inference_steps=request["steps"],
                guidance_scale=request["guidance_scale"],
                generator=torch.Generator().manual_seed(request["seed"])).frames[0]


def test_ti2v_text_to_video_on_three_nodes_matches_the_pipeline(tmp_path):
    run = engine_run("wan_t2v.yaml", tmp_path / "out", "model.path=tiny-ti2v")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["state"] for r in run.report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    frames = np.load(run.out / "r1.npy")
    assert frames.shape == (9, 48, 64, 3)
    assert np.array_equal(frames, reference_frames(request))
    assert live_workers(run.out) == []
    # 48x64, 9 frames: latents [1, 48, 3, 6, 8] float32 from the transformer to the decoder
    assert run.report["requests"][0]["edges"]["phase2"]["tensor_bytes"] == 48 * 3 * 6 * 8 * 4
