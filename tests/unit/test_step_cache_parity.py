"""Step caching at threshold 0 (every method) and ``none`` computes exactly what the diffusers pipelines compute, bit
for bit: Wan2.1 text and image to video with guidance, Wan2.2 TI2V-5B image to video (a timestep per token), the
Wan2.2 two-expert graph on one node and on two DiT nodes, Qwen-Image with true CFG and Z-Image with guidance. At threshold 0 every pass runs through the cache's block routing
(measures taken, residuals kept), so these tests hold that routing to the transformer's own result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.spec.schema import StepCacheSpec
from engine.stepcache.stats import collect
from nodes.z_image.family import ZImageRequest
from tests.unit import test_qwen_image_runtime as qwen
from tests.unit import test_wan_experts as experts
from tests.unit import test_wan_parity as wan
from tests.unit import test_wan_ti2v as ti2v
from tests.unit import test_z_image_family as z_image
from tests.unit.test_qwen_image_runtime import sources, t2i_pipelines  # noqa: F401 - fixtures
from tests.unit.test_z_image_family import pipeline, source  # noqa: F401 - fixtures
from tests.unit.wan_support import PARTITIONS
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread

EXACT = [StepCacheSpec(method=method, threshold=0.0) for method in ("teacache", "magcache", "fbcache")]
SETTINGS = [StepCacheSpec(method="none"), *EXACT]


def settings_id(settings: StepCacheSpec) -> str:
    return settings.method if settings.method == "none" else f"{settings.method}-0"


def ran_every_pass(caches, passes: int) -> None:
    """The stage opened one cache, which ran ``passes`` passes and skipped none."""
    (cache,) = caches
    assert (cache.stats.passes_run, cache.stats.passes_skipped) == (passes, 0)
    assert len(cache.trace) == (passes if cache.settings.active else 0)


@pytest.mark.parametrize("settings", SETTINGS, ids=settings_id)
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_wan_equals_the_pipeline(task, settings):
    request = wan.make_request(task, 32, 48, 5.0, seed=11).model_copy(update={"cache": settings})

    with collect() as caches:
        tensors, _ = wan.run_partition(task, PARTITIONS["three_nodes"], "float32", request)

    assert torch.equal(tensors["frames"], wan.reference_frames(task, "float32", request.model_copy(update={"cache": None})))
    ran_every_pass(caches, 2 * wan.STEPS)


@pytest.mark.parametrize("settings", EXACT, ids=settings_id)
def test_wan22_ti2v_equals_the_pipeline(settings):
    request = ti2v.make_request("ti2v", guidance_scale=5.0).model_copy(update={"cache": settings})

    with collect() as caches:
        tensors = ti2v.run_nodes("ti2v", ti2v.THREE_NODES, "float32", request)

    assert torch.equal(tensors["frames"], ti2v.reference_frames("float32", request))
    ran_every_pass(caches, 2 * request.steps)


@pytest.mark.parametrize("settings", EXACT, ids=settings_id)
@pytest.mark.parametrize("nodes", [experts.ONE_NODE, experts.FOUR_NODES], ids=["one_node", "four_nodes"])
def test_wan22_experts_equal_the_pipeline(nodes, settings):
    request = experts.make_request("t2v_experts", 0.9).model_copy(update={"cache": settings})

    with collect() as caches:
        tensors = experts.run_nodes("t2v_experts", nodes, request)

    assert torch.equal(tensors["frames"], experts.reference_frames("t2v_experts", request))
    high, low = caches  # one cache per expert stage, each on its own transformer
    assert high.stack.blocks is not low.stack.blocks
    high_steps = experts.HIGH_STEPS[0.9]
    assert {entry.step for entry in high.trace} == set(range(high_steps))
    assert {entry.step for entry in low.trace} == set(range(high_steps, experts.STEPS))


@pytest.mark.parametrize("settings", SETTINGS, ids=settings_id)
def test_qwen_image_equals_the_pipeline(sources, t2i_pipelines, settings):  # noqa: F811 - fixtures
    request = qwen.family.request_type("t2i")(prompt="a red fox in fresh snow", negative_prompt="blurry, dark",
                                              height=48, width=80, steps=3, true_cfg_scale=4.0, seed=7, cache=settings)

    with collect() as caches:
        outputs, _ = qwen.run_partition("t2i", sources["t2i"], qwen.THREE_NODES["t2i"], request)

    assert torch.equal(outputs["image"], qwen.monolithic(t2i_pipelines["float32"], request))
    ran_every_pass(caches, 2 * request.steps)


@pytest.mark.parametrize("settings", SETTINGS, ids=settings_id)
def test_z_image_equals_the_pipeline(source, pipeline, settings):  # noqa: F811 - fixtures
    # guidance on the first of three steps only: the batched branch "cond+uncond", then "cond"
    request = ZImageRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", height=48, width=80, steps=3,
                            seed=5, guidance_scale=3.0, cfg_normalization=1.0, cfg_truncation=0.1, cache=settings)

    with collect() as caches:
        image = z_image.run_nodes(source, (z_image.STAGES,), request)["image"]

    expected = pipeline(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                        width=request.width, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                        cfg_normalization=request.cfg_normalization, cfg_truncation=request.cfg_truncation,
                        generator=torch.Generator().manual_seed(request.seed), output_type="np").images
    assert np.array_equal(image.numpy(), expected)
    ran_every_pass(caches, request.steps)
    if settings.active:
        assert [entry.branch for entry in caches[0].trace] == ["cond+uncond", "cond", "cond"]


SKIPPING = [StepCacheSpec(method="teacache", threshold=5.0), StepCacheSpec(method="magcache", threshold=5.0),
            StepCacheSpec(method="fbcache", threshold=5.0)]


@pytest.mark.parametrize("settings", SKIPPING, ids=lambda s: s.method)
def test_qwen_image_and_z_image_skip_passes_with_a_threshold(sources, source, settings):  # noqa: F811 - fixtures
    """The skip path hands each family's block outputs on in their own form (Qwen-Image's two streams): passes are
    skipped, the image is finite and differs from the exact one."""
    qwen_request = qwen.family.request_type("t2i")(prompt="a red fox", negative_prompt="blurry", height=48, width=80,
                                                   steps=6, true_cfg_scale=4.0, seed=7)
    z_request = ZImageRequest(prompt="a lighthouse", negative_prompt="blurry", height=48, width=80, steps=6, seed=5,
                              guidance_scale=3.0)
    runs = {
        "qwen_image": lambda request: qwen.run_partition("t2i", sources["t2i"], qwen.ONE_NODE["t2i"], request)[0]["image"],
        "z_image": lambda request: z_image.run_nodes(source, (z_image.STAGES,), request)["image"],
    }
    for name, request in (("qwen_image", qwen_request), ("z_image", z_request)):
        exact = runs[name](request)
        with collect() as caches:
            cached = runs[name](request.model_copy(update={"cache": settings}))
        (cache,) = caches
        assert cache.stats.passes_skipped > 0, name
        assert torch.isfinite(cached).all() and not torch.equal(cached, exact), name
