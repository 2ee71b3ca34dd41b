"""`place.host: any`: nodes go to the agent device of their kind with the most room, largest first; no room is
a clear error naming the node, its need and every offer."""

from __future__ import annotations

import dataclasses

import pytest

from engine.errors import PlanError
from engine.plan.placement import Offer, place_on_agents
from tests.unit.test_runtime_scheduler import plan_of

MIB = 1 << 20


def placed(plan) -> dict[str, tuple[str, str]]:
    return {n.name: (n.host, n.device) for n in plan.nodes.values()}


def test_any_nodes_go_where_they_fit_and_others_stay():
    plan = plan_of("wan_t2v.yaml", "nodes.encoder.place.host=any", "nodes.transformer.place.host=any")
    offers = [Offer("small", "cpu", 3 * MIB), Offer("big", "cpu", 10 * MIB)]
    result = place_on_agents(plan, {"encoder": [6 * MIB], "transformer": [2 * MIB], "decoder": [1 * MIB]}, offers)
    # the encoder (largest) takes big (10 -> 4 MiB left), then the transformer goes where most room is left: 4 > 3
    assert placed(result) == {"encoder": ("big", "cpu"), "transformer": ("big", "cpu"), "decoder": ("local", "cpu")}
    result = place_on_agents(plan, {"encoder": [6 * MIB], "transformer": [3 * MIB], "decoder": [1 * MIB]},
                             [Offer("small", "cpu", 3 * MIB), Offer("big", "cpu", 8 * MIB)])
    assert placed(result)["transformer"] == ("small", "cpu")  # big has 2 MiB left: only small fits


def test_a_node_goes_to_a_device_of_its_kind():
    plan = plan_of("wan_t2v.yaml", "nodes.transformer.place.host=any")
    plan = dataclasses.replace(plan, nodes={**plan.nodes, "transformer": dataclasses.replace(plan.nodes["transformer"],
                                                                                             device="cuda:0")})
    result = place_on_agents(plan, {"encoder": [1], "transformer": [MIB], "decoder": [1]},
                             [Offer("cpu-box", "cpu", 100 * MIB), Offer("gpu-box", "cuda:1", 2 * MIB)])
    assert placed(result)["transformer"] == ("gpu-box", "cuda:1")


def test_no_room_anywhere_names_the_node_its_need_and_the_offers():
    plan = plan_of("wan_t2v.yaml", "nodes.transformer.place.host=any")
    with pytest.raises(PlanError) as info:
        place_on_agents(plan, {"encoder": [1], "transformer": [40 * MIB], "decoder": [1]},
                        [Offer("h1", "cpu", 8 * MIB), Offer("h2", "cpu", MIB)])
    assert str(info.value) == ("node 'transformer' (place.host: any) needs 40.00 MiB on cpu; no agent has that free "
                               "(h1 cpu 8.00 MiB, h2 cpu 1.00 MiB)")
    with pytest.raises(PlanError, match="no agent offers a cpu device"):
        place_on_agents(plan, {"encoder": [1], "transformer": [1], "decoder": [1]}, [])
