"""Runtime pieces that need no process: request state machine, requests from the command line, worker specs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.errors import EngineError, RequestError
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.worker.contract import worker_specs
from engine.controller.requests import run_requests
from engine.controller.tracker import ALLOWED, State, TrackedRequest
from engine.spec.load import load_graph
from nodes.wan.family import WanRequest

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def checked_graph(graph: str, *overrides: str):
    return check_graph(load_graph(GRAPHS / graph, list(overrides)))


def planned(graph: str, *overrides: str):
    checked = checked_graph(graph, *overrides)
    folder = "wan2.1-i2v-14b-480p" if "i2v" in graph else "wan2.1-t2v-1.3b"
    return build_plan(checked, CONFIGS / folder), checked


def test_request_moves_only_along_the_table():
    request = TrackedRequest("r1", WanRequest(prompt="a cat"), time.monotonic())
    request.move(State.RUNNING, "encoder")
    request.move(State.RUNNING, "transformer")
    request.move(State.DONE, "written")
    assert [e.state for e in request.events] == [State.QUEUED, State.RUNNING, State.RUNNING, State.DONE]
    assert all(a.time <= b.time for a, b in zip(request.events, request.events[1:]))
    with pytest.raises(EngineError, match="no transition from done to running"):
        request.move(State.RUNNING, "again")
    assert ALLOWED[State.FAILED] == frozenset()


def test_prompt_on_the_command_line_replaces_the_graph_requests():
    checked = checked_graph("wan_t2v.yaml")
    requests = run_requests(checked, {"prompt": "a red fox", "seed": "9"})  # values arrive as text
    assert len(requests) == 1
    assert (requests[0].prompt, requests[0].seed, requests[0].height) == ("a red fox", 9, 48)  # height from defaults


def test_fields_without_prompt_override_every_graph_request():
    checked = checked_graph("wan_t2v.yaml", "requests.1={prompt: b, seed: 5}")
    requests = run_requests(checked, {"seed": "123", "steps": "2", "guidance_scale": "3.5"})
    assert [(r.seed, r.steps, r.guidance_scale, r.prompt) for r in requests] == [
        (123, 2, 3.5, checked.requests[0].prompt), (123, 2, 3.5, "b")]
    assert run_requests(checked, {}) == list(checked.requests)


def test_a_field_the_graph_model_does_not_have_is_refused_with_the_valid_options():
    checked = checked_graph("qwen_image_t2i.yaml")
    with pytest.raises(RequestError) as caught:
        run_requests(checked, {"prompt": "x", "guidance_scale": "3", "num_frames": "5"})
    assert str(caught.value) == (
        f"--guidance-scale, --num-frames: not options of qwen_image t2i requests ({GRAPHS / 'qwen_image_t2i.yaml'}); "
        "valid: --seed, --cache, --preview-every, --prompt, --negative-prompt, --height, --width, --steps, --true-cfg-scale")


def test_command_line_values_are_validated_by_the_request_model_and_name_the_option():
    checked = checked_graph("wan_t2v.yaml")
    with pytest.raises(RequestError) as caught:
        run_requests(checked, {"steps": "x", "num_frames": "8"})
    assert str(caught.value) == ("request 1: --num-frames: num_frames must be 4k+1 (e.g. 5 or 9), got 8; "
                                 "--steps: got 'x'; input should be a valid integer, unable to parse string as an integer")
    checked = checked_graph("wan_i2v.yaml")
    with pytest.raises(RequestError, match="first.png does not exist"):
        run_requests(checked, {"prompt": "x", "image": "/nonexistent/first.png"})


def test_without_explicit_limits_the_edges_are_sized_for_the_run_requests():
    checked = checked_graph("wan_t2v.yaml")
    requests = run_requests(checked, {"height": "96", "num_frames": "17"})  # larger than every graph default
    plan = build_plan(checked, CONFIGS / "wan2.1-t2v-1.3b", requests)
    assert plan.limits == {"height": 96, "width": 64, "num_frames": 17}
    smaller = build_plan(checked, CONFIGS / "wan2.1-t2v-1.3b")
    assert smaller.limits == {"height": 48, "width": 64, "num_frames": 9}
    latents = {plan.edges[1].tensors[0].shape, smaller.edges[1].tensors[0].shape}
    assert latents == {(1, 16, 5, 12, 8), (1, 16, 3, 6, 8)}  # 17 frames 96 high; 9 frames 48 high
    # a smaller run request never shrinks the edges below the graph's own requests and defaults
    assert build_plan(checked, CONFIGS / "wan2.1-t2v-1.3b", run_requests(checked, {"height": "16"})).limits == smaller.limits


def test_explicit_limits_are_a_ceiling_and_every_excess_is_reported_at_once():
    limits = ("limits.height=64", "limits.width=64", "limits.num_frames=9")
    checked = checked_graph("wan_t2v.yaml", *limits, "requests.1={prompt: b}")
    assert build_plan(checked, CONFIGS / "wan2.1-t2v-1.3b", run_requests(checked, {"height": "64"})).limits == {
        "height": 64, "width": 64, "num_frames": 9}
    with pytest.raises(RequestError) as caught:
        run_requests(checked, {"height": "96", "width": "128", "num_frames": "9"})
    assert str(caught.value) == (
        f"4 values over the limits {GRAPHS / 'wan_t2v.yaml'} sets on its edge buffers:\n"
        "  request 1: height=96 exceeds limits.height = 64\n"
        "  request 1: width=128 exceeds limits.width = 64\n"
        "  request 2: height=96 exceeds limits.height = 64\n"
        "  request 2: width=128 exceeds limits.width = 64\n"
        "raise them in the graph, or with --set limits.height=96 --set limits.width=128")


def test_a_graph_without_requests_needs_a_prompt():
    checked = checked_graph("wan_t2v.yaml", "requests=[]")
    with pytest.raises(RequestError, match="declares no requests: give one with --prompt"):
        run_requests(checked, {"seed": "1"})


def specs_of(plan):
    return worker_specs(plan, run_id="t", source=Path("/m"), broker=lambda node, replica: {"host": "127.0.0.1", "port": 1},
                        out_dir=Path("/o"), save_frames=False, heartbeat_s=1.0)


def test_worker_specs_carry_each_replica_its_edges_and_segments():
    plan, _ = planned("wan_i2v_two_dit.yaml")
    specs = specs_of(plan)
    assert [(s.node, s.replica) for s in specs] == [("encoder", 0), ("transformer", 0), ("transformer", 1), ("decoder", 0)]
    encoder, transformer = specs[0], specs[1]
    assert encoder.inbound == () and [e.name for e in encoder.outbound] == ["phase1"]
    assert encoder.outbound[0].slot_bytes == plan.edge_between("encoder", "transformer").slot_bytes
    assert set(transformer.inbound[0].tensors) == {"prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition"}
    assert transformer.components == ("transformer", "scheduler")


def test_mooncake_protocol_and_nic_reach_both_ends_of_an_edge():
    plan, _ = planned("wan_t2v.yaml", "edges.0.transport=auto", "edges.0.protocol=rdma",
                      "nodes.encoder.place.rdma_device=mlx5_0", "nodes.transformer.place.rdma_device=mlx5_1")
    assert plan.edges[0].transport == "mooncake"  # auto would pick shm on one host; a protocol asks for Mooncake
    assert plan.edges[1].protocol is None  # the environment's default
    specs = {s.node: s for s in specs_of(plan)}
    assert specs["encoder"].outbound[0].protocol == specs["transformer"].inbound[0].protocol == "rdma"
    assert (specs["encoder"].rdma_device, specs["transformer"].rdma_device, specs["decoder"].rdma_device) == ("mlx5_0", "mlx5_1", None)


def test_shared_codec_node_runs_two_segments():
    plan, _ = planned("wan_t2v_shared_codec.yaml")
    (codec,) = [s for s in specs_of(plan) if s.node == "codec"]
    assert [s.stages for s in codec.segments] == [("text_encode",), ("vae_decode",)]
    assert codec.segments[1].inputs == ("latents",) and codec.final_outputs == ("frames",)
