"""Z-Image through `engine run`: real processes, broker and Mooncake; images equal the monolithic ZImagePipeline's
in one node and in three, with and without guidance; prompt embeddings cross phase1 with exactly their bytes."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import yaml

from tests.integration.engine_run import GRAPHS, engine_run, live_workers

pytestmark = pytest.mark.integration

REQUESTS = [
    {"prompt": "a fox", "seed": 1},
    # guidance on the first two of four steps (normalised times 0, 0.1, 0.25, 0.5), its norm capped at the conditional
    # prediction's
    {"prompt": "a lighthouse on a cliff at dusk, watercolor", "negative_prompt": "blurry", "guidance_scale": 3.0,
     "cfg_normalization": 1.0, "cfg_truncation": 0.2, "seed": 2},
]


@cache
def pipeline():
    import torch
    from diffusers import ZImagePipeline

    from engine.families import get_family

    pipe = ZImagePipeline.from_pretrained(get_family("z_image").resolve_source("t2i", "tiny"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(request: dict) -> np.ndarray:
    import torch

    images = pipeline()(
        prompt=request["prompt"], negative_prompt=request["negative_prompt"], height=request["height"],
        width=request["width"], num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
        cfg_normalization=request["cfg_normalization"], cfg_truncation=request["cfg_truncation"],
        generator=torch.Generator().manual_seed(request["seed"]), output_type="np").images
    return np.asarray(images)[0]


def prompt_tokens(prompt: str) -> int:
    """Tokens of the chat-templated prompt, all of which the text encoder keeps (well under 512 here)."""
    tokenizer = pipeline().tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(text).input_ids)


@pytest.mark.parametrize("graph", ["z_image_t2i.yaml", "z_image_t2i_single.yaml"])
def test_t2i_matches_the_pipeline(graph, tmp_path):
    document = yaml.safe_load((GRAPHS / graph).read_text())
    document["requests"] = REQUESTS
    (tmp_path / graph).write_text(yaml.safe_dump(document))
    run = engine_run(str(tmp_path / graph), tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert [r["state"] for r in report["requests"]] == ["done", "done"]
    for request in report["requests"]:
        params = json.loads((run.out / f"{request['id']}.json").read_text())["request"]
        expected = reference_image(params)
        assert np.array_equal(np.load(run.out / f"{request['id']}.npy"), expected)
        assert (run.out / f"{request['id']}.png").stat().st_size > 0
    assert live_workers(run.out) == []
    if graph.endswith("_single.yaml"):
        assert all(r["edges"] == {} for r in report["requests"])
        return

    text_dim = pipeline().text_encoder.config.hidden_size
    turbo, guided = (r["edges"]["phase1"]["tensor_bytes"] for r in report["requests"])
    assert turbo == prompt_tokens(REQUESTS[0]["prompt"]) * text_dim * 4  # no negative prompt without guidance
    assert guided == sum(prompt_tokens(REQUESTS[1][key]) for key in ("prompt", "negative_prompt")) * text_dim * 4
