"""Runtime pieces that need no process: request state machine, requests from the command line, worker specs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from engine.errors import EngineError, RequestError
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.runtime.deployment import worker_specs
from engine.runtime.requests import CLI_FIELDS, requests_from_args
from engine.runtime.tracker import ALLOWED, State, TrackedRequest
from engine.spec.load import load_graph
from nodes.wan.family import WanRequest

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def planned(graph: str, *overrides: str):
    checked = check_graph(load_graph(GRAPHS / graph, list(overrides)))
    folder = "wan2.1-i2v-14b-480p" if "i2v" in graph else "wan2.1-t2v-1.3b"
    return build_plan(checked, CONFIGS / folder), checked


def args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{name: given.get(name) for name in CLI_FIELDS})


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
    plan, checked = planned("wan_t2v.yaml")
    requests = requests_from_args(plan, checked, args(prompt="a red fox", seed=9))
    assert len(requests) == 1
    assert (requests[0].prompt, requests[0].seed, requests[0].height) == ("a red fox", 9, 48)  # height from defaults


def test_options_without_prompt_override_every_graph_request():
    plan, checked = planned("wan_t2v.yaml")
    (request,) = requests_from_args(plan, checked, args(seed=123, steps=2))
    assert (request.seed, request.steps, request.prompt) == (123, 2, plan.requests[0].prompt)


def test_a_request_larger_than_the_edge_buffers_is_refused_with_the_limit_named():
    plan, checked = planned("wan_t2v.yaml")
    with pytest.raises(RequestError, match=r"height=96 exceeds .*height <= 48.*limits.height"):
        requests_from_args(plan, checked, args(height=96))


def test_invalid_values_and_missing_files_are_request_errors():
    plan, checked = planned("wan_t2v.yaml")
    with pytest.raises(RequestError, match="num_frames must be 4k\\+1"):
        requests_from_args(plan, checked, args(num_frames=8))
    plan, checked = planned("wan_i2v.yaml")
    with pytest.raises(RequestError, match="first.png does not exist"):
        requests_from_args(plan, checked, args(prompt="x", image=Path("/nonexistent/first.png")))


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
