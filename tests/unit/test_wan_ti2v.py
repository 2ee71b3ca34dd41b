"""Wan2.2 TI2V-5B text to video: the Wan T2V stages run its layout (the Wan2.2 VAE with 48 latent channels and a 2x2
patchify, a timestep per latent token as the pipeline's ``expand_timesteps`` gives it) and equal WanPipeline bit for
bit, on one node and on three; a size off the model's token grid and a model_index.json that contradicts the VAE are
refused; `engine plan` sizes the real checkpoint's configs."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from engine.errors import ModelError, RequestError
from engine.plan.build import plan_graph
from engine.plan.memory import memory_report
from nodes.wan import family
from nodes.wan.family import WanRequest
from nodes.wan.presets import build_preset
from tests.unit.wan_support import _ROOT, configs, declared_dtype, declared_shape, node_components, over_edge

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
ONE_NODE = (("text_encode", "denoise", "vae_decode"),)
THREE_NODES = (("text_encode",), ("denoise",), ("vae_decode",))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread and share this machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def tiny_ti2v() -> Path:
    folder = _ROOT / "tiny-ti2v"
    build_preset("tiny-ti2v", "t2v", folder)
    return folder


def make_request(**changes) -> WanRequest:
    return WanRequest(**{**dict(prompt="a red fox running through snow", negative_prompt="blurry", height=32, width=48,
                                num_frames=5, steps=3, guidance_scale=5.0, seed=7), **changes})


@cache
def reference_frames(dtype: str, request: WanRequest) -> torch.Tensor:
    """WanPipeline as the diffusers Wan examples load it (VAE in float32); expand_timesteps from model_index.json."""
    source = tiny_ti2v()
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(source, vae=vae, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps
    frames = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                  width=request.width, num_frames=request.num_frames, num_inference_steps=request.steps,
                  guidance_scale=request.guidance_scale, generator=torch.Generator().manual_seed(request.seed)).frames
    return torch.from_numpy(frames)


def run_nodes(nodes: tuple[tuple[str, ...], ...], dtype: str, request: WanRequest,
              source: Path | None = None) -> dict[str, torch.Tensor]:
    """Every stage on its node, tensors crossing nodes as raw bytes, outputs checked against their declarations."""
    source = source or tiny_ti2v()
    model_configs = configs(source)
    symbols = family.shape_symbols("t2v", model_configs, request)
    tensors: dict[str, torch.Tensor] = {}
    produced_on: dict[str, int] = {}
    for spec in family.stages("t2v"):
        node = next(i for i, stages in enumerate(nodes) if spec.name in stages)
        components = family.load_components("t2v", node_components("t2v", nodes[node]), source, "cpu", dtype)
        stage = family.build_stage("t2v", spec.name, components, "cpu", dtype, model_configs)
        inputs = {name: tensors[name] if produced_on[name] == node else over_edge(tensors[name])
                  for name in spec.inputs if name in tensors}
        declared = {t.name: t for t in spec.outputs}
        for name, tensor in stage.run(request, inputs, lambda step, total: None).items():
            assert tensor.dtype == declared_dtype(declared[name], dtype), (name, tensor.dtype)
            assert tuple(tensor.shape) == declared_shape(declared[name], symbols), (name, tensor.shape)
            tensors[name], produced_on[name] = tensor, node
    return tensors


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("nodes", [ONE_NODE, THREE_NODES], ids=["one_node", "three_nodes"])
def test_ti2v_text_to_video_matches_the_pipeline(nodes, guidance):
    request = make_request(guidance_scale=guidance)
    tensors = run_nodes(nodes, "float32", request)
    assert tensors["latents"].shape[1] == 48  # the Wan2.2 VAE's latent channels
    assert torch.equal(tensors["frames"], reference_frames("float32", request))


def test_ti2v_three_nodes_match_the_pipeline_in_bfloat16():
    request = make_request(height=48, width=64)
    assert torch.equal(run_nodes(THREE_NODES, "bfloat16", request)["frames"], reference_frames("bfloat16", request))


def test_a_size_off_the_token_grid_is_refused():
    """TI2V-5B's real VAE compresses 16x: a token covers 32 pixels, and 720 rows are not whole tokens."""
    source = _ROOT / "ti2v-16x"
    if not source.is_dir():
        shutil.copytree(tiny_ti2v(), source)
        vae = json.loads((source / "vae" / "config.json").read_text())
        (source / "vae" / "config.json").write_text(json.dumps({**vae, "scale_factor_spatial": 16}))
    stage = family.build_stage("t2v", "denoise", family.load_components("t2v", ("transformer", "scheduler"), source,
                                                                         "cpu", "float32"), "cpu", "float32",
                               configs(source))
    with pytest.raises(RequestError, match="height 48 and width 64 must be multiples of 32 and 32"):
        stage.run(make_request(height=48, width=64), {}, lambda step, total: None)


def test_a_model_index_that_contradicts_the_vae_is_refused(tmp_path):
    source = tmp_path / "model"
    shutil.copytree(tiny_ti2v(), source)
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": False}))
    with pytest.raises(ModelError, match="expand_timesteps must be true"):
        family.load_components("t2v", ("transformer",), source, "cpu", "float32")


def test_plan_at_the_real_ti2v_5b_configs():
    """`engine plan` at TI2V-5B's 720P (1280x704, 121 frames) in bf16: a 5.0B DiT node; 48-channel latents."""
    real = ["model.path=configs/wan2.2-ti2v-5b", "model.dtype=bf16", "limits.height=704", "limits.width=1280",
            "limits.num_frames=121"]
    plan, checked, source = plan_graph(GRAPHS / "wan_t2v.yaml", real)
    weights = {node.node: node.weights for node in memory_report(plan, checked.family, source).nodes}
    assert abs(weights["transformer"]["transformer"] - 10.0e9) < 0.1e9  # 5.0B parameters in bf16
    # latents [1, 48, 31, 44, 80] float32
    assert plan.edge_between("transformer", "decoder").slot_bytes >= 48 * 31 * 44 * 80 * 4
