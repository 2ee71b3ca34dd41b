"""Qwen-Image stages against the monolithic diffusers pipelines, on the tiny preset, on CPU.

A partition is a tuple of nodes, each a tuple of stage names. Every node loads only its own components
from the model folder; a tensor produced in one node and consumed in another crosses as raw bytes
(through numpy) and is rebuilt from its dtype and shape, as an edge delivers it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ModelError, RequestError
from engine.plan.model_check import component_configs
from engine.stages import RequestParams, Stage
from nodes.qwen_image import family
from nodes.qwen_image.family import edit_prompt_len_bound
from nodes.qwen_image.sources import resolve_source

ONE_NODE = {
    "t2i": (("text_encode", "denoise", "vae_decode"),),
    "edit": (("text_encode", "vae_encode", "denoise", "vae_decode"),),
}
THREE_NODES = {
    "t2i": (("text_encode",), ("denoise",), ("vae_decode",)),
    "edit": (("text_encode", "vae_encode"), ("denoise",), ("vae_decode",)),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The tiny presets, built into a fresh cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {task: resolve_source(task, "tiny") for task in family.tasks}


@cache
def load_node(
    task: str, source: Path, stage_names: tuple[str, ...], dtype: str = "float32"
) -> tuple[tuple[Stage, ...], dict[str, int]]:
    """One node: its stages' components loaded (and their resident bytes), its stages built.
    Cached: a node serves many requests."""
    specs = {spec.name: spec for spec in family.stages(task)}
    names = tuple(dict.fromkeys(name for stage in stage_names for name in specs[stage].components))
    components = family.load_components(task, names, source, "cpu", dtype)
    configs = component_configs(family, task, source)
    stages = tuple(family.build_stage(task, stage, components, "cpu", dtype, configs) for stage in stage_names)
    return stages, components.parameter_bytes()


def cross_edge(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the receiving node gets it: its exact bytes, rebuilt from dtype and shape."""
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape)


def run_partition(task: str, source: Path, partition, request: RequestParams, dtype: str = "float32"):
    """Run ``request`` through the nodes of ``partition``; return (all outputs, bytes of each tensor that crossed)."""
    produced: dict[str, tuple[int, torch.Tensor]] = {}  # tensor name -> (producing node, tensor)
    crossed: dict[str, int] = {}
    for node, stage_names in enumerate(partition):
        for stage in load_node(task, source, stage_names, dtype)[0]:
            inputs = {}
            for name in (name for name in stage.spec.inputs if name in produced):  # optional ones may be absent
                producer, tensor = produced[name]
                if producer != node:
                    tensor = cross_edge(tensor)
                    crossed[name] = len(tensor.view(torch.uint8).reshape(-1))
                inputs[name] = tensor
            steps: list[tuple[int, int]] = []
            outputs = stage.run(request, inputs, lambda step, total: steps.append((step, total)))
            if stage.spec.name == "denoise":
                assert steps == [(i + 1, request.steps) for i in range(request.steps)]
            assert set(outputs) <= {spec.name for spec in stage.spec.outputs}
            produced.update({name: (node, tensor) for name, tensor in outputs.items()})
    return {name: tensor for name, (_, tensor) in produced.items()}, crossed


def monolithic(pipeline, request: RequestParams, **extra) -> torch.Tensor:
    """The diffusers pipeline's float image for the same request and seed."""
    image = pipeline(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        true_cfg_scale=request.true_cfg_scale,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
        **extra,
    ).images
    return torch.from_numpy(np.asarray(image))


# -- text to image --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t2i_pipelines(sources):
    """The monolithic pipeline per model dtype."""
    from diffusers import QwenImagePipeline

    return {
        name: QwenImagePipeline.from_pretrained(sources["t2i"], dtype=getattr(torch, name))
        for name in ("float32", "bfloat16")
    }


T2I_CASES = [
    pytest.param((48, 80), None, "float32", id="landscape-no-cfg"),
    pytest.param((48, 80), "blurry, dark", "float32", id="landscape-cfg"),
    pytest.param((96, 32), None, "float32", id="portrait-no-cfg"),
    pytest.param((96, 32), " ", "float32", id="portrait-cfg"),
    pytest.param((48, 80), "blurry, dark", "bfloat16", id="landscape-cfg-bf16"),
]


@pytest.mark.parametrize(("size", "negative_prompt", "dtype"), T2I_CASES)
def test_t2i_matches_the_pipeline_bit_for_bit(sources, t2i_pipelines, size, negative_prompt, dtype):
    request = family.request_type("t2i")(
        prompt="a red fox in fresh snow", negative_prompt=negative_prompt, height=size[0], width=size[1],
        steps=2, true_cfg_scale=4.0, seed=7,
    )
    expected = monolithic(t2i_pipelines[dtype], request)
    assert expected.shape == (1, *size, 3)
    for partition in (ONE_NODE["t2i"], THREE_NODES["t2i"]):
        outputs, crossed = run_partition("t2i", sources["t2i"], partition, request, dtype)
        assert torch.equal(outputs["image"], expected)
        assert ("negative_prompt_embeds" in outputs) == (negative_prompt is not None)

    # Three nodes: Phase1 carries every prompt tensor produced, Phase2 the packed latents.
    assert set(crossed) == {name for name in outputs if name != "image"}
    assert outputs["latents"].shape == (1, (size[0] // 16) * (size[1] // 16), 64)
    assert outputs["latents"].dtype == outputs["prompt_embeds"].dtype == getattr(torch, dtype)


# -- edit -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edit_pipeline(sources):
    from diffusers import QwenImageEditPipeline

    from nodes.qwen_image.loading import load_processor

    processor = load_processor(sources["edit"] / "processor")
    return QwenImageEditPipeline.from_pretrained(sources["edit"], processor=processor)


def write_image(path: Path, width: int, height: int) -> Path:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# Every Edit run encodes its input at about one megapixel and runs the DiT over its ~4,000 latent tokens
# (seconds each on two cores), so the Edit cases pair aspect ratio, guidance and partition instead of
# taking every combination; T2I takes every combination.
EDIT_CASES = [
    pytest.param((60, 40), (48, 80), "blurry", THREE_NODES["edit"], id="landscape-cfg-three-nodes"),
    pytest.param((36, 64), (96, 48), None, ONE_NODE["edit"], id="portrait-no-cfg-one-node"),
]


@pytest.mark.parametrize(("input_size", "size", "negative_prompt", "partition"), EDIT_CASES)
def test_edit_matches_the_pipeline_bit_for_bit(
    sources, edit_pipeline, tmp_path, input_size, size, negative_prompt, partition
):
    from diffusers.utils import load_image

    image = write_image(tmp_path / "in.png", *input_size)
    request = family.request_type("edit")(
        prompt="make the sky green", negative_prompt=negative_prompt, image=image,
        height=size[0], width=size[1], steps=2, true_cfg_scale=4.0, seed=11,
    )
    expected = monolithic(edit_pipeline, request, image=load_image(str(request.image)))
    assert expected.shape == (1, *size, 3)
    outputs, crossed = run_partition("edit", sources["edit"], partition, request)
    assert torch.equal(outputs["image"], expected)

    # The input image is encoded at about a megapixel with its own aspect ratio, whatever the output size.
    width, height = (1248, 832) if input_size[0] > input_size[1] else (768, 1376)
    assert outputs["image_latents"].shape == (1, 16, 1, height // 8, width // 8)
    if partition == THREE_NODES["edit"]:
        assert crossed["image_latents"] == 16 * (height // 8) * (width // 8) * 4


# -- edges carry the real token count ------------------------------------------------------------------

@pytest.mark.parametrize("words", [3, 60, 400])
def test_prompt_embeds_cross_with_exactly_their_token_bytes(sources, words):
    prompt = " ".join(["fox"] * words)
    request = family.request_type("t2i")(prompt=prompt, negative_prompt="dark", height=32, width=32, steps=1)
    (text_encode,), _ = load_node("t2i", sources["t2i"], ("text_encode",))
    outputs = text_encode.run(request, {}, lambda step, total: None)

    # The real count: the templated prompt's tokens less the template prefix the pipeline drops, at most 512.
    pipe = text_encode.pipe
    tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids)
    tokens = min(tokens - pipe.prompt_template_encode_start_idx, 512)
    assert (tokens == 512) == (words == 400)
    text_dim = pipe.text_encoder.config.text_config.hidden_size
    embeds = outputs["prompt_embeds"]
    assert embeds.shape == (1, tokens, text_dim) and embeds.dtype == torch.float32
    assert len(cross_edge(embeds).view(torch.uint8).reshape(-1)) == tokens * text_dim * 4
    assert torch.equal(outputs["prompt_embeds_mask"], torch.ones(1, tokens, dtype=torch.int64))
    assert outputs["negative_prompt_embeds"].shape[1] < tokens


def test_nodes_hold_only_their_stages_weights(sources, t2i_pipelines):
    t2i_pipeline = t2i_pipelines["float32"]
    def bytes_of(module, prefixes=("",)):
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return sum(t.numel() * t.element_size() for name, t in tensors if name.startswith(prefixes))

    vae = t2i_pipeline.vae
    encoder_half = bytes_of(vae, ("encoder.", "quant_conv."))
    decoder_half = bytes_of(vae, ("decoder.", "post_quant_conv."))
    assert encoder_half + decoder_half == bytes_of(vae)

    nodes = {"encoder": THREE_NODES["edit"][0], "transformer": ("denoise",), "decoder": ("vae_decode",)}
    held = {node: load_node("edit", sources["edit"], stages)[1] for node, stages in nodes.items()}
    assert held["transformer"] == {"transformer": bytes_of(t2i_pipeline.transformer), "scheduler": 0}
    assert held["decoder"] == {"vae_decoder": decoder_half}
    text_encoder = bytes_of(t2i_pipeline.text_encoder)
    assert held["encoder"] == {"processor": 0, "text_encoder": text_encoder, "vae_encoder": encoder_half}

    (decode,), _ = load_node("edit", sources["edit"], ("vae_decode",))
    assert not [name for name, _ in decode.pipe.vae.named_parameters() if name.startswith(("encoder.", "quant_conv."))]


def test_output_png_is_the_pipeline_pil_image(sources, t2i_pipelines, tmp_path):
    request = family.request_type("t2i")(prompt="a lighthouse", height=32, width=48, steps=2, seed=3)
    outputs, _ = run_partition("t2i", sources["t2i"], THREE_NODES["t2i"], request)
    paths = family.write_output(request, outputs, tmp_path, "r1")
    assert [path.name for path in paths] == ["r1.png", "r1.json"]
    expected = t2i_pipelines["float32"](
        prompt=request.prompt, height=32, width=48, num_inference_steps=2, generator=torch.Generator().manual_seed(3)
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(expected))
    sidecar = json.loads(paths[1].read_text())
    assert sidecar["request"]["prompt"] == "a lighthouse" and sidecar["image"] == [32, 48, 3]

    from engine.models.outputs import write_image as write_png

    paths = write_png(request, outputs, tmp_path, "r2", meta={"graph": "g.yaml"}, save_frames=True)
    assert np.array_equal(np.load(paths[2]), outputs["image"][0].numpy())
    assert json.loads(paths[1].read_text())["graph"] == "g.yaml"


# -- errors ---------------------------------------------------------------------------------------------

def test_edit_refuses_an_input_wider_than_the_admitted_aspect(sources, tmp_path):
    request = family.request_type("edit")(prompt="x", image=write_image(tmp_path / "wide.png", 90, 20), steps=1)
    (_, vae_encode), _ = load_node("edit", sources["edit"], THREE_NODES["edit"][0])
    with pytest.raises(RequestError, match="aspect 4.50"):
        vae_encode.run(request, {}, lambda step, total: None)


def test_edit_refuses_a_prompt_past_the_planned_bound(sources, tmp_path):
    request = family.request_type("edit")(prompt="x" * 2500, image=write_image(tmp_path / "in.png", 40, 40))
    (text_encode, _), _ = load_node("edit", sources["edit"], THREE_NODES["edit"][0])
    bound = edit_prompt_len_bound(text_encode.pipe.text_encoder.config.vision_config.to_dict())
    with pytest.raises(RequestError, match=f"at most {bound} are accepted"):
        text_encode.run(request, {}, lambda step, total: None)


def test_loading_names_what_is_missing(sources, tmp_path):
    with pytest.raises(ModelError, match="no component \\['processor'\\]"):
        family.load_components("t2i", ("processor",), sources["t2i"], "cpu", "float32")
    with pytest.raises(ModelError, match="'processor' .* is missing"):
        family.load_components("edit", ("processor",), sources["t2i"], "cpu", "float32")
    with pytest.raises(ModelError, match="not a preset of qwen_image/t2i \\(tiny\\)"):
        family.resolve_source("t2i", "huge")
