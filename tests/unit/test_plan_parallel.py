"""Nodes on several devices in the plan: Ulysses checked against the model's heads and every request's tokens, each
rank's device holding the node's weights, a group placed on one agent, a pod with one GPU per rank."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from engine.errors import PlanError, SpecError
from engine.families import get_family
from engine.parallel import SINGLE, rank_layout
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.plan.memory import memory_report
from engine.plan.placement import Offer, place_on_agents
from engine.spec.load import load_graph
from tests.unit.test_deploy_k8s import container, deployments, expanded_args, render, rendered_graph

REPO = Path(__file__).resolve().parents[2]
GRAPH = REPO / "graphs" / "wan_t2v_parallel.yaml"
GPUS = "nodes.transformer.place.devices=[cuda:0, cuda:1, cuda:2, cuda:3]"
MIB = 1 << 20


def plan(*overrides: str, source: Path | None = None):
    checked = check_graph(load_graph(GRAPH, ["broker=mqtt://127.0.0.1:1", *overrides]))
    source = source or get_family("wan").resolve_source("t2v", "tiny")
    return build_plan(checked, source), checked, source


def problems(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        plan(*overrides)
    return [str(p) for p in caught.value.problems]


def test_ulysses_needs_the_heads_to_divide():
    (problem,) = problems("nodes.transformer.parallel.cfg=1", "nodes.transformer.parallel.ulysses=4")
    assert "nodes.transformer.parallel.ulysses" in problem and "wan_t2v_parallel.yaml" in problem
    assert "the transformer's 2 attention heads do not split over ulysses 4" in problem


def test_ulysses_needs_every_request_tokens_to_divide():
    # 48x80, 9 frames: 3 latent frames of 6x10 latents, 2x2 patches: 45 tokens
    (problem,) = problems("requests=[{prompt: a, width: 80}]")
    assert "request 1: its 45 wan DiT tokens do not split over ulysses 2" in problem
    (problem,) = problems("limits={width: 80}")
    assert "the largest request (limits and defaults): its 45 wan DiT tokens" in problem


def test_each_rank_device_holds_the_weights_and_rank_0_the_receive_slots():
    planned, checked, source = plan(GPUS, source=REPO / "configs" / "wan2.1-t2v-1.3b")
    node = planned.nodes["transformer"]
    assert node.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3") and node.ranks == 4
    report = memory_report(planned, checked.family, source)
    memory = next(m for m in report.nodes if m.node == "transformer")
    receive = sum(e.slots * e.slot_bytes for e in planned.edges_into("transformer"))
    assert memory.receive_bytes == receive > 0
    assert memory.rank_bytes == (memory.weight_bytes + receive, *[memory.weight_bytes] * 3)
    assert memory.total_bytes == 4 * memory.weight_bytes + receive
    fits = {d.device: d.required for d in report.devices}
    assert fits["cuda:1"] == fits["cuda:2"] == fits["cuda:3"] == memory.weight_bytes
    assert fits["cuda:0"] == memory.weight_bytes + receive


def test_a_group_goes_to_one_agent_with_a_gpu_per_rank():
    planned, _, _ = plan("nodes.transformer.place.host=any", "nodes.transformer.place.devices=[cuda:0, cuda:1, cuda:2, cuda:3]")
    needs = {"encoder": [1], "decoder": [1], "transformer": [3 * MIB, 2 * MIB, 2 * MIB, 2 * MIB]}
    offers = [Offer("wide", "cuda:0", 100 * MIB), Offer("wide", "cuda:1", 100 * MIB), Offer("wide", "cuda:2", 100 * MIB),
              Offer("narrow", "cuda:0", 100 * MIB), Offer("narrow", "cuda:1", 100 * MIB),
              Offer("narrow", "cuda:2", 100 * MIB), Offer("narrow", "cuda:3", 1 * MIB)]
    with pytest.raises(PlanError, match=r"needs 3\.00 MiB on cuda on each of 4 cuda devices of one agent"):
        place_on_agents(planned, needs, offers)  # wide has 3 GPUs; narrow's fourth has no room for any rank
    offers[-1] = Offer("narrow", "cuda:3", 2 * MIB)
    placed = place_on_agents(planned, needs, offers).nodes["transformer"]
    assert placed.host == "narrow" and sorted(placed.devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert placed.device == placed.devices[0] != "cuda:3"  # rank 0 (with the receive slots) where it fits


def test_cpu_ranks_share_the_agent_cpu():
    planned, _, _ = plan("nodes.transformer.place.host=any")
    needs = {"encoder": [1], "decoder": [1], "transformer": [2 * MIB] * 4}
    placed = place_on_agents(planned, needs, [Offer("small", "cpu", 7 * MIB), Offer("big", "cpu", 9 * MIB)])
    assert (placed.nodes["transformer"].host, placed.nodes["transformer"].devices) == ("big", ("cpu",) * 4)


def test_a_pod_gets_one_gpu_per_rank(tmp_path: Path):
    files = render(tmp_path / "k8s", GRAPH, "--set", GPUS.replace("cuda:0, cuda:1, cuda:2, cuda:3", "cuda:2, cuda:5, cuda:6, cuda:7"))
    transformer = deployments(files)["node-transformer"]
    assert container(transformer)["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    args = expanded_args(transformer)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--device"] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    spec = rendered_graph(files, tmp_path).loaded.spec
    assert spec.nodes["transformer"].place.all_devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert spec.nodes["transformer"].parallel.cfg == 2 and spec.nodes["transformer"].parallel.ulysses == 2
    assert yaml.safe_load(files["graph.yaml"][0]["data"]["graph.yaml"])["nodes"]["encoder"]["place"]["device"] == "cpu"


def test_rank_layout_puts_a_branch_on_consecutive_ranks():
    cfg_groups, ulysses_groups = rank_layout(2, 2)
    assert cfg_groups == [[0, 2], [1, 3]] and ulysses_groups == [[0, 1], [2, 3]]
    assert rank_layout(1, 4) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])


def test_a_single_device_split_computes_every_branch_itself():
    calls = []
    assert SINGLE.predict([lambda: calls.append("cond") or 1, lambda: calls.append("uncond") or 2]) == [1, 2]
    assert calls == ["cond", "uncond"]
    assert dataclasses.replace(SINGLE, cfg=2).predict([lambda: 7]) == [7]  # no guidance: nothing to exchange


def test_engine_graph_shows_a_node_ranks_and_split():
    from engine.display import graph_text

    planned, _, _ = plan()
    row = next(line for line in graph_text(planned).splitlines() if line.startswith("transformer"))
    assert "cpu x4 (cfg 2 x ulysses 2)" in row
