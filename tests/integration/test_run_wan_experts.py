"""Wan2.2 A14B through `engine run`: the two experts on one node and on two DiT nodes (encoder, dit_high, dit_low,
decoder) with real processes, broker and Mooncake; the frames equal the monolithic WanImageToVideoPipeline's (and, for
T2V-A14B on four nodes, WanPipeline's) with transformer_2 and boundary_ratio, the boundary falling between two steps of UniPC's order-2 multistep loop; the
hand-over edge carries exactly the latents and the scheduler's state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration.engine_run import engine_run, live_workers

pytestmark = pytest.mark.integration


def reference_frames(task: str, request: dict) -> np.ndarray:
    """The monolithic pipeline with both experts, the VAE in float32 as in the diffusers Wan examples."""
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    from engine.families import get_family

    source = get_family("wan").resolve_source(task, "tiny")
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    extra = {}
    if task == "i2v_experts":
        pipe = WanImageToVideoPipeline.from_pretrained(source, vae=vae, boundary_ratio=request["boundary_ratio"])
        extra["image"] = Image.open(request["image"]).convert("RGB")
    else:
        pipe = WanPipeline.from_pretrained(source, vae=vae, boundary_ratio=request["boundary_ratio"])
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=request["prompt"], negative_prompt=request["negative_prompt"], height=request["height"],
                width=request["width"], num_frames=request["num_frames"], num_inference_steps=request["steps"],
                guidance_scale=request["guidance_scale"], guidance_scale_2=request["guidance_scale_2"],
                generator=torch.Generator().manual_seed(request["seed"]), **extra).frames[0]


@pytest.mark.parametrize("graph", ["wan22_i2v_experts.yaml", "wan22_i2v_experts_single.yaml", "wan22_t2v_experts.yaml"])
def test_experts_match_the_pipeline(graph, tmp_path):
    run = engine_run(graph, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert [r["state"] for r in report["requests"]] == ["done"]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    task = "t2v_experts" if graph.startswith("wan22_t2v") else "i2v_experts"
    assert np.array_equal(np.load(run.out / "r1.npy"), reference_frames(task, request))
    assert live_workers(run.out) == []
    if graph.endswith("_single.yaml"):
        assert report["requests"][0]["edges"] == {}
        return

    assert {n["node"] for n in report["nodes"]} == {"encoder", "dit_high", "dit_low", "decoder"}
    # 48x64, 9 frames: latents [1, 16, 3, 6, 8] float32. Two high-noise steps of four: the latents, the last sample
    # and both steps of history, their two timesteps and three counters.
    latent = 16 * 3 * 6 * 8 * 4
    assert report["requests"][0]["edges"]["boundary"]["tensor_bytes"] == 4 * latent + 2 * 8 + 3 * 8
