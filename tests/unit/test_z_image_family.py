"""Z-Image: the declaration (stages, requests, shape symbols, config checks, no weights) and the stages against
the monolithic ZImagePipeline on the tiny preset, on CPU, in one node and in three."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engine.families import get_family
from engine.plan.model_check import component_configs
from nodes.z_image import family
from nodes.z_image.family import ZImageRequest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "z-image-turbo"
STAGES = ("text_encode", "denoise", "vae_decode")


def real_configs() -> dict[str, dict]:
    return {folder: json.loads((CONFIGS / folder / "config.json").read_text())
            for folder in ("vae", "text_encoder", "transformer")}


def test_registered_and_importable_without_torch():
    assert get_family("z_image") is family
    code = "import sys, nodes.z_image; assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stages_read_what_earlier_stages_write_and_name_only_declared_components():
    produced: set[str] = set()
    for stage in family.stages("t2i"):
        assert set(stage.inputs) <= produced, stage.name
        produced |= {spec.name for spec in stage.outputs}
    named = {name for stage in family.stages("t2i") for name in stage.components}
    assert named == set(family.components("t2i")) == {"tokenizer", "text_encoder", "transformer", "scheduler",
                                                     "vae_decoder"}
    assert family.components("t2i")["vae_decoder"].prefixes == ("decoder.", "post_quant_conv.")


def test_prompt_embeddings_are_variable_length_and_the_negative_ones_optional():
    outputs = {spec.name: spec for spec in family.stages("t2i")[0].outputs}
    assert all(spec.shape[1] == "prompt_len" and spec.variable == (1,) for spec in outputs.values())
    assert {name: spec.optional for name, spec in outputs.items()} == {"prompt_embeds": False,
                                                                      "negative_prompt_embeds": True}


def test_shape_symbols_and_config_checks_on_the_real_configs():
    configs = real_configs()
    assert family.check_configs("t2i", configs) == []
    symbols = family.shape_symbols("t2i", configs, ZImageRequest(prompt="x", height=1024, width=1536))
    assert (symbols["text_dim"], symbols["prompt_len"], symbols["z_dim"]) == (2560, 512, 16)
    assert (symbols["latent_h"], symbols["latent_w"]) == (128, 192)


def test_config_checks_name_every_field_the_stages_cannot_run():
    configs = real_configs()
    configs["vae"] = {**configs["vae"], "block_out_channels": [128, 256, 512, 512, 512]}  # 16x: 32-pixel tokens
    configs["transformer"] = {**configs["transformer"], "in_channels": 32, "all_patch_size": [4], "cap_feat_dim": 4096}
    problems = {(p.folder, p.key) for p in family.check_configs("t2i", configs)}
    assert problems == {("vae", "block_out_channels"), ("transformer", "in_channels"),
                        ("transformer", "all_patch_size"), ("transformer", "cap_feat_dim")}
    del configs["vae"]["shift_factor"]
    assert [str(p) for p in family.check_configs("t2i", configs)] == ["vae/config.json shift_factor: missing"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "x", "height": 1000}, "multiple of 16"),
        ({"prompt": "x", "guidance_scale": -1}, "greater than or equal to 0"),
        ({"prompt": "x", "true_cfg_scale": 2.0}, "Extra inputs are not permitted"),
    ],
)
def test_requests_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        ZImageRequest(**fields)


def test_turbo_defaults_run_without_guidance():
    request = ZImageRequest(prompt="x")
    assert (request.steps, request.guidance_scale, request.guidance) == (9, 0.0, False)
    assert ZImageRequest(prompt="x", guidance_scale=0.5).guidance


# -- the stages against ZImagePipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny preset, built into a fresh cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return family.resolve_source("t2i", "tiny")


@pytest.fixture(scope="module")
def pipeline(source):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(source, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_tiny_tokenizer_writes_qwen3s_chat_template(pipeline):
    messages = [{"role": "user", "content": "a fox"}]
    text = pipeline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True)
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"


def run_nodes(source: Path, nodes: tuple[tuple[str, ...], ...], request: ZImageRequest) -> dict[str, torch.Tensor]:
    """Run ``request`` through ``nodes``, each loading only its stages' components; a tensor crossing between
    nodes is rebuilt from its bytes, as an edge delivers it."""
    configs = component_configs(family, "t2i", source)
    specs = {spec.name: spec for spec in family.stages("t2i")}
    tensors: dict[str, torch.Tensor] = {}
    for node in nodes:
        names = tuple(dict.fromkeys(name for stage in node for name in specs[stage].components))
        components = family.load_components("t2i", names, source, "cpu", "float32")
        received = {name: torch.from_numpy(tensor.numpy().copy()) for name, tensor in tensors.items()}
        for stage_name in node:
            stage = family.build_stage("t2i", stage_name, components, "cpu", "float32", configs)
            received.update(stage.run(request, {n: received[n] for n in stage.spec.inputs if n in received},
                                      lambda step, total: None))
        tensors = received
    return tensors


@pytest.mark.parametrize("nodes", [(STAGES,), tuple((stage,) for stage in STAGES)], ids=["one_node", "three_nodes"])
# "cfg": guidance with its norm capped on the first of three steps only (normalised times 0, 0.14, 0.4)
@pytest.mark.parametrize("guidance", [{}, {"guidance_scale": 3.0, "cfg_normalization": 1.0, "cfg_truncation": 0.1}],
                         ids=["turbo", "cfg"])
def test_stages_equal_the_pipeline(source, pipeline, nodes, guidance):
    request = ZImageRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", height=48, width=80, steps=3,
                            seed=5, **guidance)
    image = run_nodes(source, nodes, request)["image"]
    expected = pipeline(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                        width=request.width, num_inference_steps=request.steps,
                        guidance_scale=request.guidance_scale, cfg_normalization=request.cfg_normalization,
                        cfg_truncation=request.cfg_truncation, generator=torch.Generator().manual_seed(request.seed),
                        output_type="np").images
    assert np.array_equal(image.numpy(), expected)


def test_a_node_loads_only_the_decoder_half_of_the_vae(source):
    components = family.load_components("t2i", ("vae_decoder",), source, "cpu", "float32")
    vae = components.objects["vae_decoder"]
    assert vae.encoder is None and {name.split(".")[0] for name, _ in vae.named_parameters()} == {"decoder"}
