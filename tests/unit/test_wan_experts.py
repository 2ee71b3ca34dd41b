"""Wan2.2 A14B: the two experts as two stages equal diffusers' pipelines with ``transformer_2`` and
``boundary_ratio`` bit for bit, on one node and on four (encoder, dit_high, dit_low, decoder), with the boundary
after one step (one step of multistep history), after two (UniPC's full order-2 history) and after three of an
order-3 loop; each expert node holds only its own transformer, half the one-node layout's DiT bytes at the real
configs of I2V-A14B and T2V-A14B; the hand-over is refused when the two nodes disagree on the boundary."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from engine.errors import ModelError
from engine.plan.build import plan_graph
from engine.plan.memory import memory_report
from engine.stages import LoadedComponents
from nodes.wan import family
from nodes.wan.family import WanExpertsImageRequest, WanExpertsRequest
from tests.unit.wan_support import configs, declared_dtype, declared_shape, load_node, node_components, over_edge, tiny
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"

ONE_NODE = (("text_encode", "vae_encode", "denoise_high", "denoise_low", "vae_decode"),)
FOUR_NODES = (("text_encode", "vae_encode"), ("denoise_high",), ("denoise_low",), ("vae_decode",))
STEPS = 5  # tiny preset (flow_shift 3): timesteps 999, 923, 818, 667, 429
HIGH_STEPS = {0.95: 1, 0.9: 2}  # boundary_ratio -> steps of the high-noise expert



@cache
def first_frame():
    path = tiny("i2v_experts").parent / "experts_first_frame.png"
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    return path


def make_request(task: str, boundary_ratio: float) -> WanExpertsRequest:
    fields = dict(prompt="a red fox running through snow", negative_prompt="blurry", height=32, width=48,
                  num_frames=5, steps=STEPS, guidance_scale=5.0, guidance_scale_2=3.0, boundary_ratio=boundary_ratio,
                  seed=7)
    if task == "i2v_experts":
        return WanExpertsImageRequest(image=first_frame(), **fields)
    return WanExpertsRequest(**fields)


def reference_frames(task: str, request: WanExpertsRequest,
                     scheduler: UniPCMultistepScheduler | None = None) -> torch.Tensor:
    """The monolithic pipeline with both experts (and ``scheduler`` when given), its VAE in float32 as in the
    diffusers Wan examples."""
    source = tiny(task)
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    extra = {}
    if task == "i2v_experts":
        pipe = WanImageToVideoPipeline.from_pretrained(source, vae=vae, boundary_ratio=request.boundary_ratio)
        extra["image"] = Image.open(request.image).convert("RGB")
    else:
        pipe = WanPipeline.from_pretrained(source, vae=vae, boundary_ratio=request.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    frames = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                  width=request.width, num_frames=request.num_frames, num_inference_steps=request.steps,
                  guidance_scale=request.guidance_scale, guidance_scale_2=request.guidance_scale_2,
                  generator=torch.Generator().manual_seed(request.seed), **extra).frames
    return torch.from_numpy(frames)


def run_nodes(task: str, nodes: tuple[tuple[str, ...], ...], request: WanExpertsRequest,
              scheduler: UniPCMultistepScheduler | None = None) -> dict[str, torch.Tensor]:
    """Every stage on its node (the stages of no node are left out), with ``scheduler`` in place of the model's
    when given; a tensor crossing nodes goes over as raw bytes; outputs checked against their declarations
    (variable dimensions at most their bound)."""
    model_configs = configs(tiny(task))
    symbols = family.shape_symbols(task, model_configs, request)
    tensors: dict[str, torch.Tensor] = {}
    produced_on: dict[str, int] = {}
    for spec in (spec for spec in family.stages(task) if any(spec.name in stages for stages in nodes)):
        node = next(i for i, stages in enumerate(nodes) if spec.name in stages)
        components = load_node(task, nodes[node], "float32")
        if scheduler is not None and "scheduler" in components.objects:
            components = LoadedComponents({**components.objects, "scheduler": scheduler})
        stage = family.build_stage(task, spec.name, components, "cpu", "float32", model_configs)
        inputs = {name: tensors[name] if produced_on[name] == node else over_edge(tensors[name])
                  for name in spec.inputs if name in tensors}
        outputs = stage.run(request, inputs, lambda step, total: None)
        declared = {t.name: t for t in spec.outputs}
        for name, tensor in outputs.items():
            bound = declared_shape(declared[name], symbols)
            assert tensor.dtype == declared_dtype(declared[name], "float32"), (name, tensor.dtype)
            assert all(size == limit or (i in declared[name].variable and size <= limit)
                       for i, (size, limit) in enumerate(zip(tensor.shape, bound))), (name, tensor.shape, bound)
            tensors[name], produced_on[name] = tensor, node
    return tensors


@pytest.mark.parametrize("boundary_ratio", list(HIGH_STEPS))
@pytest.mark.parametrize("nodes", [ONE_NODE, FOUR_NODES], ids=["one_node", "four_nodes"])
def test_i2v_experts_match_the_pipeline(nodes, boundary_ratio):
    request = make_request("i2v_experts", boundary_ratio)
    tensors = run_nodes("i2v_experts", nodes, request)
    assert torch.equal(tensors["frames"], reference_frames("i2v_experts", request))
    # the hand-over: the high-noise expert's steps of history, as many as it took (at most the solver order 2)
    assert tensors["scheduler_counters"].tolist() == [HIGH_STEPS[boundary_ratio], HIGH_STEPS[boundary_ratio],
                                                      HIGH_STEPS[boundary_ratio]]
    assert len(tensors["scheduler_model_outputs"]) == HIGH_STEPS[boundary_ratio]


def test_a_boundary_after_three_steps_of_an_order_3_loop():
    """UniPC of order 3: the high-noise expert hands over its full three steps of history."""
    scheduler = UniPCMultistepScheduler.from_config(load_node("i2v_experts", ("denoise_high",), "float32")
                                                    .objects["scheduler"].config, solver_order=3)
    request = make_request("i2v_experts", 0.8)  # 999, 923, 818 | 667, 429
    tensors = run_nodes("i2v_experts", FOUR_NODES, request, scheduler)
    assert tensors["scheduler_counters"].tolist() == [3, 3, 3]
    assert torch.equal(tensors["frames"], reference_frames("i2v_experts", request, scheduler))


def test_t2v_experts_match_the_pipeline_on_four_nodes():
    request = make_request("t2v_experts", 0.875)  # T2V-A14B's boundary: two high-noise steps of five
    nodes = (("text_encode",), ("denoise_high",), ("denoise_low",), ("vae_decode",))
    assert torch.equal(run_nodes("t2v_experts", nodes, request)["frames"], reference_frames("t2v_experts", request))


def test_each_expert_node_loads_only_its_own_transformer():
    assert node_components("i2v_experts", ("denoise_high",)) == ("transformer", "scheduler")
    assert node_components("i2v_experts", ("denoise_low",)) == ("transformer_2", "scheduler")
    high, low = (load_node("i2v_experts", (stage,), "float32").parameter_bytes() for stage in ("denoise_high",
                                                                                              "denoise_low"))
    assert set(high) == {"transformer", "scheduler"} and set(low) == {"transformer_2", "scheduler"}
    assert high["transformer"] == low["transformer_2"] > 0


def test_the_low_noise_expert_refuses_a_hand_over_at_another_boundary():
    high = run_nodes("i2v_experts", FOUR_NODES[:2], make_request("i2v_experts", 0.95))
    stage = family.build_stage("i2v_experts", "denoise_low", load_node("i2v_experts", ("denoise_low",), "float32"),
                               "cpu", "float32", configs(tiny("i2v_experts")))
    with pytest.raises(ModelError, match="handed over after step 1; with boundary_ratio 0.9 it takes 2 of 5 steps"):
        stage.run(make_request("i2v_experts", 0.9), high, lambda step, total: None)


def test_guidance_scale_2_defaults_to_guidance_scale():
    request = WanExpertsRequest(prompt="x", guidance_scale=4.0)
    assert (request.low_noise_guidance_scale, request.boundary_ratio) == (4.0, 0.875)
    assert WanExpertsImageRequest(prompt="x", image=first_frame()).boundary_ratio == 0.9


@pytest.mark.parametrize("task", ["i2v", "t2v"])
def test_plan_at_the_real_a14b_configs_puts_one_expert_on_each_dit_node(task):
    """`engine plan` at 720P bf16: each expert node holds one 14.3B expert, half the one-node layout's DiT bytes."""
    real = [f"model.path=configs/wan2.2-{task}-a14b", "model.dtype=bf16", "limits.height=720", "limits.width=1280",
            "limits.num_frames=81"]
    weights = {}
    for graph in (f"wan22_{task}_experts.yaml", f"wan22_{task}_experts_single.yaml"):
        plan, checked, source = plan_graph(GRAPHS / graph, real)
        weights.update({node.node: node.weights for node in memory_report(plan, checked.family, source).nodes})
    one_node_dit = weights["all"]["transformer"] + weights["all"]["transformer_2"]
    assert weights["dit_high"].keys() == {"transformer", "scheduler"} and weights["dit_low"].keys() == {"transformer_2",
                                                                                                      "scheduler"}
    assert weights["dit_high"]["transformer"] == weights["dit_low"]["transformer_2"] == one_node_dit // 2
    assert abs(one_node_dit - 57.2e9) < 0.3e9  # two 14.3B experts in bf16
