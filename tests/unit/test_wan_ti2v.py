"""Wan2.2 TI2V-5B: text to video, the Wan T2V stages run its layout (the Wan2.2 VAE with 48 latent channels and a 2x2
patchify, a timestep per latent token as the pipeline's ``expand_timesteps`` gives it) and equal WanPipeline bit for
bit, on one node and on three; image to video (task ti2v: the image's latent as the first latent frame, at timestep 0)
equals WanImageToVideoPipeline with expand_timesteps the same way. A size off the model's token grid, a
model_index.json that contradicts the VAE and the other image-to-video tasks on such a model are refused; `engine
plan` sizes the real checkpoint's configs."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from engine.cli import main
from engine.errors import ModelError, RequestError
from engine.plan.build import build_plan, plan_graph
from engine.plan.memory import memory_report
from engine.plan.shapes import evaluate_shape
from engine.stages import ConfigProblem
from nodes.wan import family
from nodes.wan.family import WanImageRequest, WanRequest
from nodes.wan.presets import build_preset
from tests.unit.wan_support import _ROOT, configs, declared_dtype, declared_shape, node_components, over_edge
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
FIRST_FRAME = GRAPHS / "assets" / "first_frame.png"  # 320x240: resized to every request
# The nodes of the three-node graphs; a task runs those of its stages it has (t2v has no vae_encode).
ONE_NODE = (("text_encode", "vae_encode", "denoise", "vae_decode"),)
THREE_NODES = (("text_encode", "vae_encode"), ("denoise",), ("vae_decode",))



@cache
def tiny_ti2v(task: str = "t2v") -> Path:
    """The tiny-ti2v preset of ``task`` (t2v: under WanPipeline; ti2v: the same model under WanImageToVideoPipeline)."""
    folder = _ROOT / f"tiny-ti2v-{task}"
    build_preset("tiny-ti2v", task, folder)
    return folder


def make_request(task: str = "t2v", **changes) -> WanRequest:
    fields = {**dict(prompt="a red fox running through snow", negative_prompt="blurry", height=32, width=48,
                     num_frames=5, steps=3, guidance_scale=5.0, seed=7), **changes}
    return WanImageRequest(image=FIRST_FRAME, **fields) if task == "ti2v" else WanRequest(**fields)


@cache
def reference_frames(dtype: str, request: WanRequest) -> torch.Tensor:
    """The pipeline as the diffusers Wan examples load it (VAE in float32), expand_timesteps from model_index.json:
    WanPipeline, or for an image request WanImageToVideoPipeline (no image encoder: the model has none)."""
    task = "ti2v" if isinstance(request, WanImageRequest) else "t2v"
    source = tiny_ti2v(task)
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    pipeline = WanImageToVideoPipeline if task == "ti2v" else WanPipeline
    pipe = pipeline.from_pretrained(source, vae=vae, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps
    extra = {"image": Image.open(request.image).convert("RGB")} if task == "ti2v" else {}
    frames = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                  width=request.width, num_frames=request.num_frames, num_inference_steps=request.steps,
                  guidance_scale=request.guidance_scale, generator=torch.Generator().manual_seed(request.seed),
                  **extra).frames
    return torch.from_numpy(frames)


def run_nodes(task: str, nodes: tuple[tuple[str, ...], ...], dtype: str, request: WanRequest,
              source: Path | None = None) -> dict[str, torch.Tensor]:
    """Every stage of ``task`` on its node, tensors crossing nodes as raw bytes, outputs checked against their
    declarations."""
    source = source or tiny_ti2v(task)
    model_configs = configs(source)
    symbols = family.shape_symbols(task, model_configs, request)
    tensors: dict[str, torch.Tensor] = {}
    produced_on: dict[str, int] = {}
    for spec in family.stages(task):
        node = next(i for i, stages in enumerate(nodes) if spec.name in stages)
        components = family.load_components(task, node_components(task, nodes[node]), source, "cpu", dtype)
        stage = family.build_stage(task, spec.name, components, "cpu", dtype, model_configs)
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
    tensors = run_nodes("t2v", nodes, "float32", request)
    assert tensors["latents"].shape[1] == 48  # the Wan2.2 VAE's latent channels
    assert torch.equal(tensors["frames"], reference_frames("float32", request))


def test_ti2v_three_nodes_match_the_pipeline_in_bfloat16():
    request = make_request(height=48, width=64)
    assert torch.equal(run_nodes("t2v", THREE_NODES, "bfloat16", request)["frames"],
                       reference_frames("bfloat16", request))


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("nodes", [ONE_NODE, THREE_NODES], ids=["one_node", "three_nodes"])
def test_ti2v_image_to_video_matches_the_pipeline(nodes, guidance):
    request = make_request("ti2v", guidance_scale=guidance)
    tensors = run_nodes("ti2v", nodes, "float32", request)
    # The image's latent is the first latent frame of what the decoder gets; the loop denoised the others.
    assert torch.equal(tensors["latents"][:, :, :1], tensors["condition"])
    assert not torch.equal(tensors["latents"][:, :, 1:], tensors["condition"].expand_as(tensors["latents"][:, :, 1:]))
    assert torch.equal(tensors["frames"], reference_frames("float32", request))


def test_ti2v_image_to_video_on_three_nodes_matches_the_pipeline_in_bfloat16():
    request = make_request("ti2v", height=48, width=64)
    tensors = run_nodes("ti2v", THREE_NODES, "bfloat16", request)
    assert tensors["condition"].dtype == torch.float32  # mixed with the float32 latents before the cast
    assert torch.equal(tensors["frames"], reference_frames("bfloat16", request))


def test_the_first_frame_condition_is_declared_float32_of_one_latent_frame():
    """Unlike Wan2.1 I2V's condition (mask and latent channels over every frame, in the node's dtype)."""
    (condition,) = next(spec for spec in family.stages("ti2v") if spec.name == "vae_encode").outputs
    assert (condition.name, condition.dtype) == ("condition", "float32")
    assert condition.shape == ("batch", "z_dim", 1, "latent_h", "latent_w")
    real = configs(Path(__file__).resolve().parents[2] / "configs" / "wan2.2-ti2v-5b")
    symbols = family.shape_symbols("ti2v", real, make_request("ti2v", height=704, width=1280, num_frames=121))
    assert evaluate_shape(condition.shape, symbols) == (1, 48, 1, 44, 80)
    denoise = next(spec for spec in family.stages("ti2v") if spec.name == "denoise")
    assert denoise.inputs == ("prompt_embeds", "negative_prompt_embeds", "condition")  # no CLIP image tokens


def test_image_to_video_of_a_ti2v_model_is_task_ti2v(capsys):
    """i2v (and i2v_experts) on a model whose VAE patchifies is refused naming ti2v, whether the model is the
    preset, the real configs or configs that reach the family's checks; ti2v on a Wan2.1 model is refused."""
    instead = "its image to video is task ti2v (graphs/wan22_ti2v.yaml)"
    assert family.check_configs("i2v", configs(tiny_ti2v())) == [
        ConfigProblem("vae", "patch_size", f"2, the Wan2.2 VAE of a TI2V-5B model: {instead}, not i2v")]
    capsys.readouterr()  # building the preset writes progress
    for graph, model, refusal in [
        ("wan_i2v.yaml", "tiny-ti2v", f"preset 'tiny-ti2v' is not a model of wan i2v; it serves t2v, ti2v; {instead}"),
        ("wan_i2v.yaml", "configs/wan2.2-ti2v-5b", "wan i2v cannot run this model: configs/wan2.2-ti2v-5b/vae/config.json "
                                                   f"patch_size: 2, the Wan2.2 VAE of a TI2V-5B model: {instead}, not i2v"),
        ("wan22_i2v_experts.yaml", "configs/wan2.2-ti2v-5b",
         "wan i2v_experts cannot run this model: configs/wan2.2-ti2v-5b/vae/config.json patch_size: 2, the Wan2.2 VAE "
         f"of a TI2V-5B model: {instead}, not i2v_experts"),
        ("wan22_ti2v.yaml", "tiny", "preset 'tiny' is not a model of wan ti2v; it serves t2v, i2v, t2v_experts, "
                                    "i2v_experts"),
    ]:
        for command in ("validate", "plan"):
            assert main([command, str(GRAPHS / graph), "--set", f"model.path={model}"]) == 1
            assert capsys.readouterr().err == (f"error: 1 problem in the graph:\n  {GRAPHS / graph} (--set "
                                               f"model.path={model}) model.path: {refusal}\n")
    assert main(["validate", str(GRAPHS / "wan22_ti2v.yaml"), "--set", "model.path=configs/wan2.1-t2v-1.3b"]) == 1
    assert ("configs/wan2.1-t2v-1.3b/vae/config.json patch_size: not set; ti2v runs Wan2.2 TI2V-5B, whose VAE "
            "patchifies") in capsys.readouterr().err


OFF_GRID = ("is not a multiple of 32: a transformer token of this model covers 32x32 pixels (vae "
            "scale_factor_spatial 16 x transformer patch_size [2, 2])")


def test_validate_refuses_a_request_off_the_real_models_token_grid(capsys):
    """The graph's own 48x64 request fits the tiny model's 16-pixel tokens, not TI2V-5B's 32: validate and plan refuse
    it at the line of the default that gave it, before any worker starts; a run's request off the grid is refused
    by the plan as well, naming its field."""
    graph = str(GRAPHS / "wan22_ti2v.yaml")
    for command in ("validate", "plan"):
        assert main([command, graph, "--set", "model.path=configs/wan2.2-ti2v-5b"]) == 1
        assert capsys.readouterr().err == (f"error: 1 problem in the graph:\n  {graph}:31 request.height: 48 {OFF_GRID}; "
                                           "use 32 or 64\n")
    sets = ["--set", "model.path=configs/wan2.2-ti2v-5b", "--set", "requests.0.height=720", "--set", "limits.width=80"]
    assert main(["validate", graph, *sets]) == 1
    err = capsys.readouterr().err
    assert f"{graph} (--set requests.0.height=720) requests[0].height: 720 {OFF_GRID}; use 704 or 736" in err
    assert f"{graph} (--set limits.width=80) limits.width: 80 {OFF_GRID}; use 64 or 96" in err
    assert main(["validate", graph, "--set", "model.path=configs/wan2.2-ti2v-5b", "--set", "request.height=64"]) == 0
    capsys.readouterr()
    plan, checked, source = plan_graph(GRAPHS / "wan22_ti2v.yaml", ["model.path=configs/wan2.2-ti2v-5b", "request.height=64"])
    with pytest.raises(RequestError) as caught:
        build_plan(checked, source, [checked.requests[0].model_copy(update={"width": 80})])
    assert str(caught.value) == f"wan ti2v cannot run this request on this model:\n  request 1: width: 80 {OFF_GRID}; use 64 or 96"


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
    with pytest.raises(RequestError, match="^height: 48 is not a multiple of 32: .*; use 32 or 64$"):
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
    real = ["model.path=configs/wan2.2-ti2v-5b", "model.dtype=bf16", "request.height=704", "request.width=1280",
            "request.num_frames=121"]
    plan, checked, source = plan_graph(GRAPHS / "wan_t2v.yaml", real)
    weights = {node.node: node.weights for node in memory_report(plan, checked.family, source).nodes}
    assert abs(weights["transformer"]["transformer"] - 10.0e9) < 0.1e9  # 5.0B parameters in bf16
    # latents [1, 48, 31, 44, 80] float32
    assert plan.edge_between("transformer", "decoder").slot_bytes >= 48 * 31 * 44 * 80 * 4


def test_plan_of_ti2v_image_to_video_at_the_real_configs():
    """The three-node image-to-video graph at 1280x704, 121 frames, bf16: the same 5.0B DiT node as text to video;
    the encoder sends the prompt embeddings and one float32 latent frame."""
    real = ["model.path=configs/wan2.2-ti2v-5b", "model.dtype=bf16", "request.height=704", "request.width=1280",
            "request.num_frames=121"]
    plan, checked, source = plan_graph(GRAPHS / "wan22_ti2v.yaml", real)
    weights = {node.node: node.weights for node in memory_report(plan, checked.family, source).nodes}
    assert abs(weights["transformer"]["transformer"] - 10.0e9) < 0.1e9
    assert set(weights["encoder"]) == {"tokenizer", "text_encoder", "vae_encoder"}  # no image encoder
    # prompt and negative prompt embeddings [1, 512, 4096] bf16, condition [1, 48, 1, 44, 80] float32
    assert plan.edge_between("encoder", "transformer").slot_bytes == 2 * 512 * 4096 * 2 + 48 * 44 * 80 * 4
    # latents [1, 48, 31, 44, 80] float32
    assert plan.edge_between("transformer", "decoder").slot_bytes == 48 * 31 * 44 * 80 * 4
