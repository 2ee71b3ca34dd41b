"""Where a scale-out's replica goes (engine.controller.placing): a device with room for one replica, a free one
first; agents' devices for `place.host: any`; no room said as such."""

from __future__ import annotations

from types import SimpleNamespace

from engine.controller.fleet import ReplicaInfo
from engine.controller.placing import NoRoom, Placed, ReplicaPlacer, Spot, choose_spot
from engine.plan.placement import Offer
from tests.unit.test_runtime_scheduler import plan_of

GIB = 2**30


def test_a_free_device_goes_first_then_the_roomiest():
    offers = [Offer("local", "cuda:0", 10 * GIB), Offer("local", "cuda:1", 3 * GIB), Offer("local", "cuda:2", 4 * GIB)]
    taken = [Placed(("local", "cuda:0"), GIB, loaded=True)]
    spot = choose_spot(2 * GIB, offers, taken)
    assert spot == Spot("local", "cuda:2", "on local cuda:2: 4.00 GiB free for 2.00 GiB, a free device")
    busy = [*taken, Placed(("local", "cuda:1"), GIB, True), Placed(("local", "cuda:2"), GIB, True)]
    assert choose_spot(2 * GIB, offers, busy).device == "cuda:0"  # every device used: the roomiest
    assert "1 replica(s) there already" in choose_spot(2 * GIB, offers, busy).reason


def test_replicas_still_loading_hold_their_bytes_against_the_free_memory():
    offers = [Offer("local", "cuda:0", 5 * GIB)]
    assert isinstance(choose_spot(2 * GIB, offers, [Placed(("local", "cuda:0"), 2 * GIB, loaded=False)]), Spot)
    loading = [Placed(("local", "cuda:0"), 2 * GIB, loaded=False)] * 2
    refused = choose_spot(2 * GIB, offers, loading)
    assert refused == NoRoom("no room: a replica needs 2.00 GiB; free: local cuda:0 1.00 GiB")
    assert choose_spot(GIB, [], []) == NoRoom("no room: a replica needs 1.00 GiB; no device offered")


def fleet_of(*replicas: tuple[str, int, tuple[str, str] | None]) -> SimpleNamespace:
    infos = {(node, replica): ReplicaInfo(node, replica, state="ready", where=where) for node, replica, where in replicas}
    plan = plan_of("wan_t2v.yaml")
    return SimpleNamespace(replicas=infos, where=lambda info: info.where or (plan.nodes[info.node].host,
                                                                          plan.nodes[info.node].device))


def test_an_any_node_goes_to_a_live_agent_of_its_kind_with_room():
    plan = plan_of("wan_t2v.yaml", "nodes.transformer.place.device=cuda:0")
    agents = [Offer("h1", "cuda:0", 2 * GIB), Offer("h2", "cuda:0", 20 * GIB), Offer("h2", "cpu", 99 * GIB),
              Offer("h3", "cuda:1", 30 * GIB)]
    placer = ReplicaPlacer(plan, dict.fromkeys(plan.nodes, 4 * GIB), frozenset({"transformer"}), agents=lambda: agents,
                           local=lambda: [Offer("local", "cuda:0", 80 * GIB)])
    # The first replica was placed on h3 at deploy: h2's device is free, and roomy enough.
    fleet = fleet_of(("transformer", 0, ("h3", "cuda:1")))
    assert placer.place("transformer", fleet).where == ("h2", "cuda:0")
    # Nothing of its kind with room: no room, naming each agent device of its kind (not the local one, nor cpus).
    placer.needs = dict.fromkeys(plan.nodes, 40 * GIB)
    assert placer.place("transformer", fleet) == NoRoom(
        "no room: a replica needs 40.00 GiB; free: h1 cuda:0 2.00 GiB, h2 cuda:0 20.00 GiB, h3 cuda:1 30.00 GiB")


def test_a_node_on_a_named_agent_stays_on_it_and_a_local_node_on_this_host():
    plan = plan_of("wan_t2v.yaml", "nodes.encoder.place.host=h1")
    agents = [Offer("h1", "cpu", 2 * GIB), Offer("h2", "cpu", 20 * GIB)]
    placer = ReplicaPlacer(plan, dict.fromkeys(plan.nodes, GIB), frozenset(), agents=lambda: agents,
                           local=lambda: [Offer("local", "cpu", 3 * GIB)])
    fleet = fleet_of(("encoder", 0, None), ("decoder", 0, None))
    assert placer.place("encoder", fleet).where == ("h1", "cpu")
    assert placer.place("decoder", fleet).where == ("local", "cpu")


def test_an_elastic_node_needs_room_at_deploy_for_its_fewest_replicas_only():
    from engine.plan.memory import NodeMemory
    from engine.plan.placement import deploy_needs

    plan = plan_of("wan_t2v.yaml", "nodes.transformer.replicas={min: 1, max: 3}", "nodes.decoder.replicas=2")
    memory = [NodeMemory("transformer", "any", "cpu", 3, "float32", {}, {"transformer": 100}, 20),
              NodeMemory("decoder", "local", "cpu", 2, "float32", {}, {"vae_decoder": 10}, 5)]
    assert deploy_needs(plan, memory) == {"transformer": (120,), "decoder": (30,)}
