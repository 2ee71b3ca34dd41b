"""An elastic node in process: the controller with its autoscaler against the in-memory bus, and fake workers that
take a while per segment, one at a time, report their busy seconds and queue in their heartbeats, and stop when told.
Every request must finish once: no decode segment lost or run twice, whatever the replicas do meanwhile."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from engine.control.bus import LastWill
from engine.control.heartbeat import Progress, publish_heartbeats
from engine.control.memory import MemoryBroker
from engine.control.messages import CpuShare, RunStage, Shutdown, StageDone
from engine.control.topics import Topics
from engine.controller.controller import Controller, RunOptions
from engine.controller.placing import ReplicaPlacer
from engine.plan.placement import Offer
from engine.controller.tracker import State
from tests.unit.test_runtime_scheduler import FakeLauncher, plan_of

ELASTIC = ("nodes.decoder.replicas={min: 1, max: 2}", "scaling.window_s=0.5", "scaling.in_window_s=1",
           "scaling.cooldown_s=0.5")
WORK_S = {"encoder": 0.01, "transformer": 0.01, "decoder": 0.12}
GIB = 2**30
ROOMY = [Offer("local", "cpu", 64 * GIB)]  #: this host as a fake: room for any replica


class TimedLauncher(FakeLauncher):
    """Fake workers that spend ``WORK_S[node]`` on each segment, in order of arrival, answer a repeated dispatch
    once, and exit on a shutdown order; ``shares`` records the CPU shares they were told."""

    def __init__(self, broker: MemoryBroker, topics: Topics):
        super().__init__(broker, topics, lambda node, replica: "done")
        self.stopped: list[tuple[str, int]] = []
        self.shares: list[tuple[str, int, float]] = []
        self.finished: list[tuple[str, int, str]] = []  # node, replica, request of every segment answered
        self.devices: dict[tuple[str, int], str] = {}  # the device each replica was started on

    def start(self, spec, secrets) -> None:
        self.devices[(spec.node, spec.replica)] = spec.device
        super().start(spec, secrets)

    async def _worker(self, node: str, replica: int) -> None:
        key, client = (node, replica), self.topics.replica_client(node, replica)
        bus = self.broker.connect(client, will=LastWill(self.topics.status(node, replica), self._status(node, replica, "dead")))
        await bus.subscribe(self.topics.inbox(node, replica))
        await bus.publish(self.topics.status(node, replica), self._status(node, replica, "ready"), retain=True)
        progress, jobs, seen = Progress(), asyncio.Queue(), set()
        self.heartbeats[key] = asyncio.create_task(publish_heartbeats(
            bus, self.topics.heartbeat(node, replica), node, replica, progress, period_s=0.05))

        async def compute() -> None:
            while True:
                order = await jobs.get()
                progress.waiting = jobs.qsize()
                progress.stage_started(order.request_id, "work", 0)
                await asyncio.sleep(WORK_S[node])
                progress.request_finished()
                self.finished.append((node, replica, order.request_id))
                await bus.publish(self.topics.controller, StageDone(
                    request_id=order.request_id, node=node, replica=replica, attempt=order.attempt, timings={},
                    edges={}, outputs=[], peak_rss_bytes=0, busy_s=WORK_S[node]))

        computing = asyncio.create_task(compute())
        try:
            async for inbound in bus.messages():
                message = inbound.message
                if isinstance(message, RunStage) and (message.request_id, message.segment, message.attempt) not in seen:
                    seen.add((message.request_id, message.segment, message.attempt))
                    self.orders.append((node, replica, message))
                    jobs.put_nowait(message)
                    progress.waiting = jobs.qsize()
                elif isinstance(message, CpuShare):
                    self.shares.append((node, replica, message.share))
                elif isinstance(message, Shutdown):
                    assert jobs.empty() and progress.snapshot().request_id is None, f"{key} stopped with work left"
                    self.stopped.append(key)
                    return
        finally:
            computing.cancel()
            self.heartbeats[key].cancel()
            await bus.close()
            self.dead[key] = "process exited with code 0"


def deployment(tmp_path: Path, *overrides: str, autoscale: bool = True, local: list[Offer] = ROOMY,
               need: int = GIB, cpu_budget: bool = False) -> tuple[Controller, TimedLauncher]:
    """The controller over fake workers; ``local``: this host's devices as the placer sees them, ``need``: one
    replica's bytes of every node."""
    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True, autoscale=autoscale, cpu_budget=cpu_budget)
    launcher = TimedLauncher(broker, Topics(options.run_id))
    plan = plan_of("wan_t2v.yaml", *overrides)
    placer = ReplicaPlacer(plan, dict.fromkeys(plan.nodes, need), frozenset(), local=lambda: local)
    controller = Controller(plan, tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id), placer=placer)
    return controller, launcher


async def within(work, seconds: float):
    async with asyncio.timeout(seconds):
        return await work


def burst(controller: Controller, requests: int, then=None):
    """Submit ``requests`` at once, serve until they end, then until ``then()`` if given; the requests."""
    from nodes.wan.family import WanRequest

    async def scenario():
        async with controller.deployed() as scheduler:
            handles = [scheduler.submit(WanRequest(prompt="a cat", seed=i)) for i in range(requests)]
            await controller.serve_until(lambda: all(handle.finished for handle in handles))
            if then is not None:
                await controller.serve_until(then)
            return [handle.request for handle in handles]

    return asyncio.run(within(scenario(), 30))


def assert_each_ran_once(requests, launcher: TimedLauncher) -> None:
    assert [r.state for r in requests] == [State.DONE] * len(requests)
    decoded = Counter(request for node, _, request in launcher.finished if node == "decoder")
    assert decoded == Counter({r.id: 1 for r in requests}), "a decode lost or run twice"


def test_a_burst_scales_the_decoder_out_and_idle_scales_it_back_in(tmp_path):
    controller, launcher = deployment(tmp_path, *ELASTIC)
    requests = burst(controller, 24, then=lambda: ("decoder", 1) in launcher.stopped)

    assert_each_ran_once(requests, launcher)
    events = list(controller.autoscaler.events)
    assert [(e.node, e.direction) for e in events] == [("decoder", "out"), ("decoder", "in")]
    assert events[0].reason in ("busy", "queue") and events[1].reason == "idle"
    assert {replica for node, replica, _ in launcher.finished if node == "decoder"} == {0, 1}  # both decoded
    assert ("decoder", 1) not in controller.fleet.replicas and controller.fleet.counts("decoder") == (1, 0, 0)
    assert launcher.started.count(("decoder", 1)) == 1  # started once, stopped once
    assert controller.autoscaler.counts[("decoder", "in", "idle")] == 1


def test_a_replica_drained_with_work_finishes_it_first(tmp_path):
    controller, launcher = deployment(tmp_path, *ELASTIC)
    fleet = controller.fleet
    drained = {}

    def drain_once_busy() -> bool:  # a scale-in at the worst moment: decoder[1] holds work
        info = fleet.replicas.get(("decoder", 1))
        if not drained and info is not None and info.assigned >= 1:
            drained["assigned"] = info.assigned
            fleet.drain(info.key)
        return bool(drained) and ("decoder", 1) in launcher.stopped

    from nodes.wan.family import WanRequest

    async def scenario():
        async with controller.deployed() as scheduler:
            handles = [scheduler.submit(WanRequest(prompt="a cat", seed=i)) for i in range(30)]
            await controller.serve_until(drain_once_busy)
            await controller.serve_until(lambda: all(handle.finished for handle in handles))
            return [handle.request for handle in handles]

    requests = asyncio.run(within(scenario(), 30))
    assert drained["assigned"] >= 1
    assert_each_ran_once(requests, launcher)
    given = [order.request_id for node, replica, order in launcher.orders if (node, replica) == ("decoder", 1)]
    done = [request for node, replica, request in launcher.finished if (node, replica) == ("decoder", 1)]
    assert given[:len(done)] == done and len(done) >= drained["assigned"]  # what it was given, it finished


def test_with_autoscale_off_an_elastic_node_keeps_its_minimum(tmp_path):
    controller, launcher = deployment(tmp_path, *ELASTIC, autoscale=False)
    requests = burst(controller, 12)
    assert_each_ran_once(requests, launcher)
    assert not controller.autoscaler.events and ("decoder", 1) not in launcher.started


def test_workers_share_the_cores_by_the_work_they_do(tmp_path):
    """Three workers on one host start with a third each; once measured, the decoder (most of the work) is told a
    larger share and the others smaller ones."""
    controller, launcher = deployment(tmp_path, "scaling.window_s=0.5")
    requests = burst(controller, 16, then=lambda: any(node == "decoder" for node, _, _ in launcher.shares))
    assert all(r.state == State.DONE for r in requests)
    told = {node: share for node, _, share in launcher.shares}
    assert told["decoder"] > 0.5 and all(told.get(node, 1 / 3) < 1 / 3 for node in ("encoder", "transformer"))
    assert sum(told.get(node, 1 / 3) for node in ("encoder", "transformer", "decoder")) <= 1.0 + 1e-6



def test_a_scale_out_goes_to_a_free_local_device_and_the_event_says_why(tmp_path):
    """The decoder on cuda:0 (room left there) scales out onto cuda:1, which no replica uses; the CPU's room does not
    count for a cuda node."""
    local = [Offer("local", "cpu", 64 * GIB), Offer("local", "cuda:0", 3 * GIB), Offer("local", "cuda:1", 2 * GIB)]
    controller, launcher = deployment(tmp_path, *ELASTIC, "nodes.decoder.place.device=cuda:0", local=local)
    requests = burst(controller, 24, then=lambda: bool(controller.autoscaler.events))
    assert all(r.state == State.DONE for r in requests)
    event = controller.autoscaler.events[0]
    assert (event.node, event.direction, event.replica) == ("decoder", "out", 1)
    assert launcher.devices[("decoder", 0)] == "cuda:0" and launcher.devices[("decoder", 1)] == "cuda:1"
    assert "on local cuda:1: 2.00 GiB free for 1.00 GiB, a free device" in event.detail, event.detail


def test_a_scale_out_with_no_room_starts_nothing_and_the_event_says_so(tmp_path):
    controller, launcher = deployment(tmp_path, *ELASTIC, local=[Offer("local", "cpu", 100 * 2**20)])
    requests = burst(controller, 24)
    assert_each_ran_once(requests, launcher)
    events = list(controller.autoscaler.events)
    assert events and {(e.node, e.direction, e.reason, e.replica) for e in events} == {("decoder", "out", "no_room", None)}
    assert "no room: a replica needs 1.00 GiB; free: local cpu 100.00 MiB" in events[0].detail, events[0].detail
    assert ("decoder", 1) not in launcher.started and controller.autoscaler.counts[("decoder", "out", "no_room")] == len(events)
    assert len(events) <= 1 + requests[-1].seconds / controller.plan.scaling.cooldown_s  # at most one a cooldown


def closed_loop(controller: Controller, clients: int, seconds: float, cores: int) -> list:
    """``clients`` each submitting a request as soon as its last one ended, for ``seconds``, the autoscaler seeing
    ``cores`` cores on this host; every request."""
    from nodes.wan.family import WanRequest

    async def scenario():
        async with controller.deployed() as scheduler:
            controller.autoscaler.cores = lambda: cores
            handles, end = [], asyncio.get_running_loop().time() + seconds

            def more() -> bool:
                if asyncio.get_running_loop().time() > end:
                    return all(handle.finished for handle in handles)
                while sum(not handle.finished for handle in handles) < clients:
                    handles.append(scheduler.submit(WanRequest(prompt="a cat", seed=len(handles))))
                return False

            await controller.serve_until(more)
            return [handle.request for handle in handles]

    return asyncio.run(within(scenario(), 30))


def test_a_busy_cpu_node_does_not_scale_out_onto_cores_its_host_has_in_full_use(tmp_path):
    """Two requests in flight keep the decoder busy with at most one waiting: on a 1-core host, whose core the
    decoder's thread keeps busy, no scale-out; with cores to spare, it scales out on the busy share."""
    controller, launcher = deployment(tmp_path, *ELASTIC, cpu_budget=True)
    requests = closed_loop(controller, clients=2, seconds=3, cores=1)
    assert_each_ran_once(requests, launcher)
    assert not controller.autoscaler.events and ("decoder", 1) not in launcher.started

    controller, launcher = deployment(tmp_path / "roomy", *ELASTIC, cpu_budget=True)
    closed_loop(controller, clients=2, seconds=3, cores=64)
    assert [(e.node, e.direction, e.reason) for e in controller.autoscaler.events][:1] == [("decoder", "out", "busy")]


def test_spare_cores_count_the_share_a_busy_node_gets_at_the_next_rebalance():
    """The decoder idled at the last re-balance (told a quarter of 2 cores: one thread) and is busy all the last
    window while the others idle: the re-balance gives it both cores, so none is spare for a second decoder."""
    from types import SimpleNamespace

    from engine.controller.autoscaler import Autoscaler
    from engine.controller.fleet import ReplicaInfo
    from engine.controller.scaling import Sample

    plan = plan_of("wan_t2v.yaml", *ELASTIC)
    infos = {(node, 0): ReplicaInfo(node, 0, state="ready") for node in plan.nodes}
    fleet = SimpleNamespace(replicas=infos, where=lambda info: ("local", "cpu"))
    now = [100.0]
    autoscaler = Autoscaler(plan, fleet, scaling=True, cpu_budget=True, clock=lambda: now[0], cores=lambda: 2)
    autoscaler.started(dict.fromkeys(infos, 0.25))
    for t in (99.0, 99.5, 100.0):  # the window (0.5 s): the decoder busy throughout, the others idle
        for key in infos:
            autoscaler.window.observe(*key, Sample(t, t - 90.0 if key[0] == "decoder" else 0.0, 0))
    assert autoscaler.spare_cores("decoder", now[0]) < 0.1
    assert autoscaler.spare_cores("decoder", now[0]) is not None and plan.nodes["decoder"].device == "cpu"


def test_a_fresh_deployment_gives_the_busy_worker_its_cores_within_seconds_not_a_window():
    """Every worker starts with the same share; the decoder busy since then is told its larger share at the first
    look after ``REBALANCE_S``, well inside the 10 s window (which the shares are still measured over)."""
    from types import SimpleNamespace

    from engine.controller.autoscaler import REBALANCE_S, Autoscaler
    from engine.controller.fleet import ReplicaInfo
    from engine.controller.scaling import Sample

    plan = plan_of("wan_t2v.yaml")
    assert plan.scaling.window_s == 10.0 and REBALANCE_S < plan.scaling.window_s
    infos = {(node, 0): ReplicaInfo(node, 0, state="ready") for node in plan.nodes}
    fleet = SimpleNamespace(replicas=infos, where=lambda info: ("local", "cpu"))
    now = [0.0]
    autoscaler = Autoscaler(plan, fleet, scaling=False, cpu_budget=True, clock=lambda: now[0], cores=lambda: 2)
    even = 1 / len(infos)
    autoscaler.started(dict.fromkeys(infos, even))
    for t in (0.5, 1.0, 1.5, 2.0):  # the decoder busy from the start, the others idle
        now[0] = t
        for key in infos:
            autoscaler.window.observe(*key, Sample(t, t if key[0] == "decoder" else 0.0, 0))
        moved = autoscaler.moved_shares()
        assert not moved or t >= REBALANCE_S
    assert moved[("decoder", 0)] > 0.9 and all(moved[key] < even for key in infos if key[0] != "decoder")
    now[0] = 2.5
    assert autoscaler.moved_shares() == {}  # told: nothing moved since, and the next look is REBALANCE_S on
