"""The Qwen-Image declaration: stages, components, requests and shape symbols (no weights loaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.families import get_family
from nodes.qwen_image import family
from nodes.qwen_image.family import EDIT_MAX_ASPECT, EDIT_MAX_TEXT_TOKENS, QwenImageEditRequest, edit_prompt_len_bound

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def real_configs(name: str) -> dict[str, dict]:
    folders = ("vae", "text_encoder", "transformer")
    return {folder: json.loads((CONFIGS / name / folder / "config.json").read_text()) for folder in folders}


def test_registered_and_importable_without_torch():
    assert get_family("qwen_image") is family
    code = "import sys, nodes.qwen_image; assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("task", family.tasks)
def test_every_input_is_produced_by_an_earlier_stage(task):
    produced: set[str] = set()
    for stage in family.stages(task):
        assert set(stage.inputs) <= produced, stage.name
        assert set(stage.components) <= set(family.components(task))
        produced |= {spec.name for spec in stage.outputs}


def test_components_are_exactly_those_the_stages_name():
    assert set(family.components("t2i")) == {"tokenizer", "text_encoder", "transformer", "scheduler", "vae_decoder"}
    assert set(family.components("edit")) == {
        "processor", "text_encoder", "vae_encoder", "transformer", "scheduler", "vae_decoder"
    }
    halves = family.components("edit")
    assert halves["vae_encoder"].folder == halves["vae_decoder"].folder == "vae"
    assert not set(halves["vae_encoder"].prefixes) & set(halves["vae_decoder"].prefixes)


def test_prompt_embeddings_are_variable_length():
    text_encode = family.stages("t2i")[0]
    for spec in text_encode.outputs:
        assert spec.shape[1] == "prompt_len" and spec.variable == (1,)
    assert {spec.name: spec.optional for spec in text_encode.outputs} == {
        "prompt_embeds": False, "prompt_embeds_mask": False,
        "negative_prompt_embeds": True, "negative_prompt_embeds_mask": True,
    }


def test_shape_symbols_from_the_real_configs():
    request = family.request_type("t2i")(prompt="x", height=928, width=1664)
    symbols = family.shape_symbols("t2i", real_configs("qwen-image"), request)
    assert symbols["text_dim"] == 3584
    assert symbols["latent_tokens"] == (928 // 16) * (1664 // 16)
    assert symbols["packed_dim"] == 4 * symbols["z_dim"] == 64
    assert symbols["prompt_len"] == 512


def test_edit_bounds_cover_every_admitted_input_aspect():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    request = QwenImageEditRequest(prompt="x", image=Path("in.png"))
    configs = real_configs("qwen-image-edit")
    symbols = family.shape_symbols("edit", configs, request)
    vision_budget = symbols["prompt_len"] - EDIT_MAX_TEXT_TOKENS
    assert symbols["prompt_len"] == edit_prompt_len_bound(configs["text_encoder"]["vision_config"])
    widest = tallest = tokens = 0
    for step in range(-400, 401):  # aspect ratios from 1:4 to 4:1, evenly in log space
        width, height, _ = calculate_dimensions(1024 * 1024, EDIT_MAX_ASPECT ** (step / 400))
        widest, tallest = max(widest, width // 8), max(tallest, height // 8)
        resized = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056)
        tokens = max(tokens, resized[0] * resized[1] // 28**2)
    assert (widest, tallest) == (symbols["image_latent_w"], symbols["image_latent_h"])
    assert tokens <= vision_budget < tokens * 1.1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "x", "height": 1000}, "multiple of 16"),
        ({"prompt": "x", "steps": 0}, "greater than or equal to 1"),
        ({"prompt": "x", "guidance_scale": 2.0}, "Extra inputs are not permitted"),
    ],
)
def test_requests_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        family.request_type("t2i")(**fields)


def test_true_cfg_needs_a_negative_prompt_and_a_scale_above_one():
    request_type = family.request_type("t2i")
    assert not request_type(prompt="x").true_cfg
    assert not request_type(prompt="x", negative_prompt="y", true_cfg_scale=1.0).true_cfg
    assert request_type(prompt="x", negative_prompt="", true_cfg_scale=1.5).true_cfg


def test_edit_image_path_resolves_against_the_request_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")  # resolving checks the file (readable, its aspect ratio)
    request = QwenImageEditRequest(prompt="x", image=Path("in.png"))
    assert request.resolve_paths(tmp_path).image == tmp_path / "in.png"
    assert request.resolve_paths(tmp_path).resolve_paths(Path("/elsewhere")).image == tmp_path / "in.png"
