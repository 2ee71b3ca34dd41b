"""Qwen-Image stages against the monolithic diffusers pipelines, on the tiny preset, on CPU.

A partition is a tuple of nodes, each a tuple of stage names. Every node loads only its own components
from the model folder; a tensor produced in one node and consumed in another crosses as raw bytes
(through numpy) and is rebuilt from its dtype and shape, as an edge delivers it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.stages import RequestParams, Stage
from nodes.qwen_image import family
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
def load_node(task: str, source: Path, stage_names: tuple[str, ...]) -> tuple[tuple[Stage, ...], dict[str, int]]:
    """One node: its stages' components loaded (and their resident bytes), its stages built.
    Cached: a node serves many requests."""
    specs = {spec.name: spec for spec in family.stages(task)}
    names = tuple(dict.fromkeys(name for stage in stage_names for name in specs[stage].components))
    components = family.load_components(task, names, source, "cpu", "float32")
    stages = tuple(family.build_stage(task, stage, components, "cpu", "float32") for stage in stage_names)
    return stages, components.parameter_bytes()


def cross_edge(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the receiving node gets it: its exact bytes, rebuilt from dtype and shape."""
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape)


def run_partition(task: str, source: Path, partition, request: RequestParams):
    """Run ``request`` through the nodes of ``partition``; return (all outputs, bytes of each tensor that crossed)."""
    produced: dict[str, tuple[int, torch.Tensor]] = {}  # tensor name -> (producing node, tensor)
    crossed: dict[str, int] = {}
    for node, stage_names in enumerate(partition):
        for stage in load_node(task, source, stage_names)[0]:
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
def t2i_pipeline(sources):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(sources["t2i"])


T2I_CASES = [
    pytest.param((48, 80), None, id="landscape-no-cfg"),
    pytest.param((48, 80), "blurry, dark", id="landscape-cfg"),
    pytest.param((96, 32), None, id="portrait-no-cfg"),
    pytest.param((96, 32), " ", id="portrait-cfg"),
]


@pytest.mark.parametrize(("size", "negative_prompt"), T2I_CASES)
def test_t2i_matches_the_pipeline_bit_for_bit(sources, t2i_pipeline, size, negative_prompt):
    request = family.request_type("t2i")(
        prompt="a red fox in fresh snow", negative_prompt=negative_prompt, height=size[0], width=size[1],
        steps=3, true_cfg_scale=4.0, seed=7,
    )
    expected = monolithic(t2i_pipeline, request)
    assert expected.shape == (1, *size, 3)
    for partition in (ONE_NODE["t2i"], THREE_NODES["t2i"]):
        outputs, crossed = run_partition("t2i", sources["t2i"], partition, request)
        assert torch.equal(outputs["image"], expected)
        assert ("negative_prompt_embeds" in outputs) == (negative_prompt is not None)
