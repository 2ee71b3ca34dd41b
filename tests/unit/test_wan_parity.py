"""A disaggregated Wan run yields the monolithic diffusers pipeline's frames, bit for bit, in every partition.

Each node loads its own components from the same tiny folder; every tensor a stage produces is checked
against its declaration (dtype, shape), and a tensor that crosses nodes goes over as raw bytes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from transformers import CLIPVisionModel

from nodes.wan import family
from nodes.wan.family import WanImageRequest, WanRequest
from tests.unit.wan_support import (
    PARTITIONS,
    configs,
    declared_dtype,
    declared_shape,
    load_node,
    over_edge,
    tiny,
)
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread

SIZES = [(32, 32), (32, 48)]  # (height, width): square and not
STEPS = 3



@cache
def first_frame() -> Path:
    """A deterministic RGB image of another size than any request, so that resizing is exercised."""
    path = tiny("i2v").parent / "first_frame.png"
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_request(task: str, height: int, width: int, guidance: float, seed: int) -> WanRequest:
    fields = dict(
        prompt="a red fox running through snow", negative_prompt="blurry, low quality", height=height,
        width=width, num_frames=5, steps=STEPS, guidance_scale=guidance, seed=seed,
    )
    return WanImageRequest(image=first_frame(), **fields) if task == "i2v" else WanRequest(**fields)


@cache
def reference_pipeline(task: str, dtype: str):
    """The monolithic pipeline as the diffusers Wan examples load it: VAE and image encoder in float32."""
    source = tiny(task)
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    if task == "t2v":
        pipe = WanPipeline.from_pretrained(source, vae=vae, dtype=getattr(torch, dtype))
    else:
        image_encoder = CLIPVisionModel.from_pretrained(source / "image_encoder", dtype=torch.float32)
        pipe = WanImageToVideoPipeline.from_pretrained(source, vae=vae, image_encoder=image_encoder, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@cache  # each reference serves every partition
def reference_frames(task: str, dtype: str, request: WanRequest) -> torch.Tensor:
    extra = {"image": Image.open(request.image).convert("RGB")} if task == "i2v" else {}
    frames = reference_pipeline(task, dtype)(
        prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height, width=request.width,
        num_frames=request.num_frames, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        generator=torch.Generator().manual_seed(request.seed), **extra,
    ).frames
    return torch.from_numpy(frames)


def run_partition(task: str, partition: list[tuple[str, ...]], dtype: str, request: WanRequest):
    """Run every stage on its node; return all tensors produced and the denoise progress calls."""
    model_configs = configs(tiny(task))
    symbols = family.shape_symbols(task, model_configs, request)
    tensors: dict[str, torch.Tensor] = {}
    produced_on: dict[str, int] = {}
    progress: list[tuple[int, int]] = []
    for spec in family.stages(task):
        node = next(i for i, stages in enumerate(partition) if spec.name in stages)
        stage = family.build_stage(task, spec.name, load_node(task, partition[node], dtype), "cpu", dtype, model_configs)
        inputs = {
            name: tensors[name] if produced_on[name] == node else over_edge(tensors[name])
            for name in spec.inputs
            if name in tensors
        }
        outputs = stage.run(request, inputs, lambda step, total: progress.append((step, total)))
        declared = {t.name: t for t in spec.outputs}
        assert set(outputs) <= set(declared), f"{spec.name} produced undeclared {set(outputs) - set(declared)}"
        for name, tensor in outputs.items():
            assert tensor.dtype == declared_dtype(declared[name], dtype), (spec.name, name, tensor.dtype)
            assert tuple(tensor.shape) == declared_shape(declared[name], symbols), (spec.name, name, tensor.shape)
            tensors[name], produced_on[name] = tensor, node
    return tensors, progress


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_partition_matches_monolithic_pipeline(task, partition, size, guidance):
    request = make_request(task, *size, guidance, seed=11)

    tensors, progress = run_partition(task, PARTITIONS[partition], "float32", request)

    assert torch.equal(tensors["frames"], reference_frames(task, "float32", request))
    assert ("negative_prompt_embeds" in tensors) == (guidance > 1.0)
    assert progress == [(step, STEPS) for step in range(1, STEPS + 1)]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_three_nodes_match_monolithic_pipeline_in_bfloat16(task):
    request = make_request(task, 32, 48, 5.0, seed=3)

    tensors, _ = run_partition(task, PARTITIONS["three_nodes"], "bfloat16", request)

    assert tensors["prompt_embeds"].dtype == torch.bfloat16  # "model" tensors cross in the node's dtype
    assert torch.equal(tensors["frames"], reference_frames(task, "bfloat16", request))


def test_seed_changes_the_video():
    first, _ = run_partition("t2v", PARTITIONS["one_node"], "float32", make_request("t2v", 32, 32, 5.0, seed=1))
    second, _ = run_partition("t2v", PARTITIONS["one_node"], "float32", make_request("t2v", 32, 32, 5.0, seed=2))

    assert not torch.equal(first["frames"], second["frames"])


def test_flow_shift_matches_the_pipeline_with_its_scheduler_rebuilt():
    request = make_request("t2v", 32, 32, 5.0, seed=5).model_copy(update={"flow_shift": 7.0})
    pipe = reference_pipeline("t2v", "float32")
    default = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(default.config, flow_shift=7.0)
    try:
        expected = reference_frames.__wrapped__("t2v", "float32", request)
    finally:
        pipe.scheduler = default

    tensors, _ = run_partition("t2v", PARTITIONS["three_nodes"], "float32", request)

    assert torch.equal(tensors["frames"], expected)
    assert not torch.equal(tensors["frames"], reference_frames("t2v", "float32", request.model_copy(update={"flow_shift": None})))
