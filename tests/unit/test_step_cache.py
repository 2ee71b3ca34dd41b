"""Step caching's rules, state and reporting on the tiny Wan model.

- With a threshold, the passes skipped are those the method's rule gives on the run's own recorded trace of
  per-step measures, recomputed here independently of the engine's rule code.
- State is per request and per branch: two requests computing at once on one stage, their steps interleaved, each
  get what they get alone (a state kept per node or per stage would mix them); so does a request after another.
- The Wan2.2 experts keep their states apart: the low-noise expert starts its own.
- A request's cache field overrides the node's; the counts reach the service's metrics.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.controller.tracker import State, TrackedRequest
from engine.spec.schema import StepCacheSpec
from engine.stepcache.cache import StepCache, TraceEntry
from engine.stepcache.stats import StepCacheStats, collect, with_node_cache
from nodes.wan import family
from nodes.wan.family import WanRequest
from nodes.wan.stepcache import teacache_profile
from tests.unit import test_wan_experts as experts
from tests.unit import test_wan_parity as wan
from tests.unit.wan_support import PARTITIONS, configs, load_node, tiny
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread

STEPS = 8
#: Thresholds that skip some passes and run others on the tiny model's 8 steps (measured: teacache's distances are
#: about 0.25 a step, fbcache's 0.07 to 0.08, the residual's magnitude ratio about 0.98).
MIXED = {"teacache": 0.5, "magcache": 0.5, "fbcache": 0.075}


def request(settings: StepCacheSpec | None, seed: int = 11) -> WanRequest:
    return wan.make_request("t2v", 32, 32, 5.0, seed=seed).model_copy(update={"steps": STEPS, "cache": settings})


def run(req: WanRequest) -> tuple[torch.Tensor, StepCache]:
    with collect() as caches:
        tensors, _ = wan.run_partition("t2v", PARTITIONS["one_node"], "float32", req)
    (cache,) = caches
    return tensors["frames"], cache


# -- the rules, recomputed from the trace ---------------------------------------------------------------------------

def teacache_skips(trace: list[TraceEntry], threshold: float, retention: int) -> list[bool]:
    """TeaCache on the trace's relative L1 distances (no fit on the tiny model): accumulate, skip below the
    threshold, reset on a computed pass."""
    accumulated, skips = 0.0, []
    for entry in trace:
        if entry.measure is None or entry.step < retention:
            accumulated = 0.0
            skips.append(False)
            continue
        accumulated += entry.measure
        skips.append(accumulated < threshold)
        if not skips[-1]:
            accumulated = 0.0
    return skips


def magcache_skips(trace: list[TraceEntry], threshold: float, retention: int, max_skips: int = 3) -> list[bool]:
    """MagCache with the magnitude ratio the trace says each decision used."""
    ratio_product, error, in_row, skips = 1.0, 0.0, 0, []
    for entry in trace:
        if entry.measure is None or entry.step < retention:
            ratio_product, error, in_row = 1.0, 0.0, 0
            skips.append(False)
            continue
        ratio_product *= entry.measure
        error += abs(1 - ratio_product)
        in_row += 1
        skips.append(error <= threshold and in_row <= max_skips)
        if not skips[-1]:
            ratio_product, error, in_row = 1.0, 0.0, 0
    return skips


def fbcache_skips(trace: list[TraceEntry], threshold: float) -> list[bool]:
    return [entry.measure is not None and entry.measure < threshold for entry in trace]


@pytest.mark.parametrize("method", list(MIXED))
def test_skipped_passes_follow_the_rule_on_the_recorded_trace(method):
    threshold = MIXED[method]
    frames, cache = run(request(StepCacheSpec(method=method, threshold=threshold)))
    exact, _ = run(request(None))

    for branch in ("cond", "uncond"):
        trace = [entry for entry in cache.trace if entry.branch == branch]
        assert [entry.step for entry in trace] == list(range(STEPS))
        expected = {"teacache": lambda: teacache_skips(trace, threshold, retention=1),
                    "magcache": lambda: magcache_skips(trace, threshold, retention=int(0.2 * STEPS + 0.5)),
                    "fbcache": lambda: fbcache_skips(trace, threshold)}[method]()
        assert [entry.skipped for entry in trace] == expected
        assert 0 < sum(expected) < STEPS - 1  # the threshold skips some passes, not all
    skipped = sum(entry.skipped for entry in cache.trace)
    assert (cache.stats.passes_run, cache.stats.passes_skipped) == (2 * STEPS - skipped, skipped)
    assert not torch.equal(frames, exact)  # a skipped pass changes the video


def test_the_fits_are_evaluated_as_numpy_poly1d_evaluates_them():
    import numpy as np

    from engine.stepcache.rules import polynomial

    coefficients = teacache_profile({"num_attention_heads": 12, "attention_head_dim": 128, "image_dim": None},
                                    family.stages("t2v")[1], 480, 832).coefficients
    for x in (0.0, 0.01, 0.05, 0.2):
        assert polynomial(coefficients)(x) == pytest.approx(np.poly1d(coefficients)(x), rel=1e-12, abs=1e-9)


def test_the_wan21_fits_go_to_the_wan21_checkpoints_only():
    t2v, i2v = family.stages("t2v")[1], family.stages("i2v")[3]
    high = family.stages("t2v_experts")[1]
    small = {"num_attention_heads": 12, "attention_head_dim": 128, "image_dim": None}
    large_i2v = {"num_attention_heads": 40, "attention_head_dim": 128, "image_dim": 1280}
    assert teacache_profile(small, t2v, 480, 832).coefficients[0] == pytest.approx(-5.21862437e04)
    assert teacache_profile(small, t2v, 480, 832).retention_steps == 5
    assert teacache_profile(large_i2v, i2v, 480, 832).coefficients[0] == pytest.approx(2.57151496e05)
    assert teacache_profile(large_i2v, i2v, 720, 1280).coefficients[0] == pytest.approx(8.10705460e03)
    assert teacache_profile({**small, "num_attention_heads": 40}, high, 720, 1280).coefficients is None  # Wan2.2
    tiny_config = configs(tiny("t2v"))["transformer"]
    assert teacache_profile(tiny_config, t2v, 32, 32).coefficients is None


# -- state per request ----------------------------------------------------------------------------------------------

def denoise_stage():
    stage_spec = family.stages("t2v")[1]
    components = load_node("t2v", PARTITIONS["one_node"][0], "float32")
    return family.build_stage("t2v", stage_spec.name, components, "cpu", "float32", configs(tiny("t2v")))


def denoise_inputs(req: WanRequest) -> dict[str, torch.Tensor]:
    text = family.build_stage("t2v", "text_encode", load_node("t2v", PARTITIONS["one_node"][0], "float32"), "cpu",
                              "float32", configs(tiny("t2v")))
    return text.run(req, {}, lambda step, total: None)


def test_two_requests_in_flight_on_one_stage_keep_their_own_state():
    stage = denoise_stage()  # one node's stage, serving both requests
    requests = [request(StepCacheSpec(method="teacache", threshold=1.0), seed=1),
                request(StepCacheSpec(method="fbcache", threshold=0.0), seed=2)]
    inputs = [denoise_inputs(req) for req in requests]

    def alone(req, tensors):
        with collect() as caches:
            latents = stage.run(req, tensors, lambda step, total: None)["latents"]
        return latents, caches[0].trace

    solo = [alone(req, tensors) for req, tensors in zip(requests, inputs)]

    # Both at once, in lock step: each finishes a step only when the other has finished it too.
    barrier = threading.Barrier(2, timeout=60)
    results: list = [None, None]

    def together(index: int) -> None:
        with collect() as caches:
            latents = stage.run(requests[index], inputs[index], lambda step, total: barrier.wait())["latents"]
        results[index] = latents, caches[0].trace

    threads = [threading.Thread(target=together, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for (latents, trace), (solo_latents, solo_trace) in zip(results, solo):
        assert torch.equal(latents, solo_latents)
        assert [(e.step, e.branch, e.skipped, e.measure) for e in trace] == \
               [(e.step, e.branch, e.skipped, e.measure) for e in solo_trace]
    assert any(e.skipped for e in solo[0][1]) and not any(e.skipped for e in solo[1][1])


def test_a_request_starts_from_no_state_after_another():
    exact, _ = run(request(StepCacheSpec(method="fbcache", threshold=0.0), seed=2))
    run(request(StepCacheSpec(method="fbcache", threshold=5.0), seed=1))  # leaves residuals behind if kept
    again, cache = run(request(StepCacheSpec(method="fbcache", threshold=5.0), seed=2))

    assert cache.trace[0].measure is None and not cache.trace[0].skipped  # its first pass compares with nothing
    assert not torch.equal(again, exact)
    alone, _ = run(request(StepCacheSpec(method="fbcache", threshold=5.0), seed=2))
    assert torch.equal(again, alone)


def test_the_two_experts_keep_their_states_apart():
    req = experts.make_request("t2v_experts", 0.9).model_copy(update={"cache": StepCacheSpec(method="fbcache",
                                                                                              threshold=5.0)})
    with collect() as caches:
        one_node = experts.run_nodes("t2v_experts", experts.ONE_NODE, req)
    with collect() as split_caches:
        four_nodes = experts.run_nodes("t2v_experts", experts.FOUR_NODES, req)

    high, low = caches
    first_low = [entry for entry in low.trace if entry.step == experts.HIGH_STEPS[0.9]]
    assert [entry.measure for entry in first_low] == [None, None]  # cond and uncond start afresh on transformer_2
    assert not any(entry.skipped for entry in first_low)
    assert any(entry.skipped for entry in low.trace) and any(entry.skipped for entry in high.trace)
    # Nothing of the cache crosses the boundary edge: the experts on two nodes skip the same passes, same video.
    assert torch.equal(one_node["frames"], four_nodes["frames"])
    assert [[(e.step, e.branch, e.skipped) for e in c.trace] for c in caches] == \
           [[(e.step, e.branch, e.skipped) for e in c.trace] for c in split_caches]


# -- settings and reporting -----------------------------------------------------------------------------------------

def test_a_request_overrides_the_nodes_cache_and_may_turn_it_off():
    node = StepCacheSpec(method="teacache", threshold=0.2)
    assert with_node_cache(WanRequest(prompt="x"), node).cache == node
    assert with_node_cache(WanRequest(prompt="x", cache="none"), node).cache == StepCacheSpec(method="none")
    assert with_node_cache(WanRequest(prompt="x", cache="fbcache:0.1"), node).cache == StepCacheSpec(method="fbcache", threshold=0.1)
    assert with_node_cache(WanRequest(prompt="x"), None).cache is None


def test_the_command_line_and_the_graph_reach_the_request_and_the_worker():
    from engine.controller.requests import run_requests
    from engine.plan.build import build_plan
    from engine.plan.check import check_graph
    from engine.spec.load import load_graph
    from engine.worker.contract import worker_specs

    graph = Path(__file__).resolve().parents[2] / "graphs" / "wan_t2v.yaml"
    checked = check_graph(load_graph(graph, ["nodes.transformer.cache={method: fbcache, threshold: 0.1}"]))
    (from_cli,) = run_requests(checked, {"prompt": "a fox", "cache": "teacache:0.3"})  # engine run --cache teacache:0.3
    assert from_cli.cache == StepCacheSpec(method="teacache", threshold=0.3)

    plan = build_plan(checked, Path(__file__).resolve().parents[2] / "configs" / "wan2.1-t2v-1.3b")
    specs = {spec.node: spec for spec in worker_specs(plan, run_id="t", source=Path("/m"), out_dir=Path("/o"),
                                                      broker=lambda node, replica: {"host": "127.0.0.1", "port": 1},
                                                      save_frames=False, heartbeat_s=1.0)}
    assert specs["transformer"].cache == StepCacheSpec(method="fbcache", threshold=0.1)
    assert specs["encoder"].cache is None


def test_none_calls_the_transformer_unrouted_and_counts_its_passes():
    _, cache = run(request(StepCacheSpec(method="none")))
    assert cache.trace == [] and cache.stats == StepCacheStats(method="none", threshold=0.0, passes_run=2 * STEPS)


def test_metrics_count_passes_run_and_skipped():
    from engine.serve.metrics import ServiceMetrics

    tracked = TrackedRequest(id="r1", params=WanRequest(prompt="x"), clock_zero=0.0, state=State.DONE)
    tracked.step_cache["denoise"] = StepCacheStats(method="teacache", threshold=0.2, passes_run=5, passes_skipped=3,
                                                   seconds_saved=1.5)
    metrics = ServiceMetrics(service=None)
    metrics.finished(tracked)

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for metric in (metrics.dit_passes, metrics.step_cache_seconds_saved) for s in metric.collect()[0].samples}
    assert samples[("engine_dit_passes_total", (("result", "skipped"), ("stage", "denoise")))] == 3
    assert samples[("engine_dit_passes_total", (("result", "run"), ("stage", "denoise")))] == 5
    assert samples[("engine_step_cache_seconds_saved_total", (("stage", "denoise"),))] == 1.5
