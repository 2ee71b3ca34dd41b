"""Dispatch, retries, deadlines, repeats and liveness, in process: the controller against the in-memory bus, with
a fake launcher whose workers answer as told (no process, no socket)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.control.bus import LastWill
from engine.control.heartbeat import Progress, publish_heartbeats
from engine.control.memory import MemoryBroker, MemoryBus
from engine.control.messages import Cancel, Heartbeat, RunStage, StageDone, StageFailed, Status
from engine.control.signing import Sealer
from engine.control.topics import Topics
from engine.errors import Interrupted
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.controller.controller import Controller, RunOptions
from engine.worker.contract import WorkerSecrets, WorkerSpec
from engine.controller.tracker import State
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]

#: How a fake worker answers a run_stage: "done", "fail", "silent" (never), "deaf" (ignores the first
#: delivery of each, answers its repeat), "die" (its process dies on the first run_stage); or how it starts:
#: "crash" (its process dies before it is ready), "hang" (it never gets ready).
Behaviour = str


def plan_of(graph: str = "wan_t2v_two_dit.yaml", *overrides: str):
    checked = check_graph(load_graph(REPO / "graphs" / graph, ["broker=mqtt://127.0.0.1:1", *overrides]))
    return build_plan(checked, REPO / "configs" / "wan2.1-t2v-1.3b")


class FakeLauncher:
    """Starts a fake worker per replica on the memory broker; ``behave(node, replica)`` says how it answers."""

    def __init__(self, broker: MemoryBroker, topics: Topics, behave: Callable[[str, int], Behaviour]):
        self.broker = broker
        self.topics = topics
        self.behave = behave
        self.tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.heartbeats: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.dead: dict[tuple[str, int], str] = {}
        self.orders: list[tuple[str, int, RunStage]] = []  # every run_stage a worker received
        self.cancels: list[tuple[str, int, str]] = []  # every cancel: node, replica, request id
        self.started: list[tuple[str, int]] = []  # every worker started, in order (a restart again)

    def start(self, spec: WorkerSpec, secrets: WorkerSecrets) -> None:
        key = (spec.node, spec.replica)
        self.started.append(key)
        self.dead.pop(key, None)  # a new process
        self.tasks[key] = asyncio.get_running_loop().create_task(self._worker(*key))

    def exited(self) -> dict[tuple[str, int], str]:
        return dict(self.dead)

    def kill(self, key: tuple[str, int]) -> None:
        for tasks in (self.tasks, self.heartbeats):
            if key in tasks:
                tasks[key].cancel()
        with contextlib.suppress(KeyError):  # its connection dies with it: the broker publishes its will
            self.broker.kill(self.topics.replica_client(*key))
        self.dead[key] = "process killed by SIGKILL"

    def stop_all(self) -> None:
        for task in [*self.tasks.values(), *self.heartbeats.values()]:
            task.cancel()

    def log_tail(self, key: tuple[str, int]) -> str:
        return ""

    def _status(self, node: str, replica: int, state: str) -> Status:
        ready = {"receive_edges": {}, "param_bytes": 0, "load_s": 0.0} if state == "ready" else {}
        return Status(node=node, replica=replica, state=state, pid=os.getpid(), host="fake", **ready)

    async def _worker(self, node: str, replica: int) -> None:
        client = self.topics.replica_client(node, replica)
        will = LastWill(self.topics.status(node, replica), self._status(node, replica, "dead"))
        bus: MemoryBus = self.broker.connect(client, will=will)
        await bus.subscribe(self.topics.inbox(node, replica))
        behaviour, seen = self.behave(node, replica), set()
        if behaviour == "crash":
            self.broker.kill(client)
            self.dead[(node, replica)] = "process exited with code 1"
            return
        if behaviour == "hang":
            await asyncio.Event().wait()
        await bus.publish(self.topics.status(node, replica), self._status(node, replica, "ready"), retain=True)
        if behaviour != "silent":  # a silent worker sends no heartbeat either
            self.heartbeats[(node, replica)] = asyncio.create_task(publish_heartbeats(
                bus, self.topics.heartbeat(node, replica), node, replica, Progress(), period_s=0.05))
        async for inbound in bus.messages():
            order = inbound.message
            if isinstance(order, Cancel):
                self.cancels.append((node, replica, order.request_id))
            if not isinstance(order, RunStage):
                continue
            self.orders.append((node, replica, order))
            question = (order.request_id, order.segment, order.attempt)
            if behaviour == "die":
                self.kill((node, replica))
                return
            if behaviour == "silent" or (behaviour == "deaf" and question not in seen):
                seen.add(question)
                continue
            answer = StageDone(request_id=order.request_id, node=node, replica=replica, attempt=order.attempt,
                               timings={}, edges={}, outputs=[], peak_rss_bytes=0) if behaviour != "fail" else StageFailed(
                request_id=order.request_id, node=node, replica=replica, attempt=order.attempt, stage="denoise",
                error_type="RuntimeError", error="out of memory", traceback_tail="", log_tail="")
            await bus.publish(self.topics.controller, answer)


def run(plan, tmp_path: Path, behave: Callable[[str, int], Behaviour] = lambda node, replica: "done", requests: int = 2,
        resend_s: float | None = None):
    """Run ``requests`` requests through a controller on the memory bus; return (result, launcher, controller)."""
    from nodes.wan.family import WanRequest

    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True)
    topics = Topics(options.run_id)
    launcher = FakeLauncher(broker, topics, behave)
    controller = Controller(plan, tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id))

    async def scenario():
        if resend_s is not None:
            original = controller._deploy  # noqa: SLF001

            async def deploy(address):
                await original(address)
                controller.scheduler.resend_s = resend_s

            controller._deploy = deploy  # noqa: SLF001
        return await asyncio.wait_for(controller.run([WanRequest(prompt="a cat", seed=i) for i in range(requests)]), 20)

    return asyncio.run(scenario()), launcher, controller


def test_requests_go_through_every_segment_spread_over_the_least_loaded_replicas(tmp_path):
    result, launcher, _ = run(plan_of(), tmp_path)
    assert [r.state for r in result.requests] == [State.DONE, State.DONE]
    assert [(node, order.request_id, order.segment) for node, _, order in launcher.orders] == [
        ("encoder", "r1", 0), ("encoder", "r2", 0), ("transformer", "r1", 1), ("transformer", "r2", 1),
        ("decoder", "r1", 2), ("decoder", "r2", 2)]
    dits = {order.request_id: replica for node, replica, order in launcher.orders if node == "transformer"}
    assert dits == {"r1": 0, "r2": 1}
    encoder_orders = {order.request_id: order.send_to for node, _, order in launcher.orders if node == "encoder"}
    assert encoder_orders == {"r1": {"phase1": 0}, "r2": {"phase1": 1}}  # each told where its outputs go
    assert all(info.assigned == 0 for info in result.replicas.values())


def test_a_dispatch_lost_on_the_way_is_sent_again_and_answered_once(tmp_path):
    result, launcher, _ = run(plan_of(), tmp_path, lambda node, replica: "deaf" if node == "transformer" else "done",
                              resend_s=0.2)
    assert [r.state for r in result.requests] == [State.DONE, State.DONE]
    transformer_orders = [order.request_id for node, _, order in launcher.orders if node == "transformer"]
    assert sorted(transformer_orders)[:4] == ["r1", "r1", "r2", "r2"]  # the first of each ignored, a repeat answered


def test_a_replica_that_dies_has_its_requests_rerun_on_the_other(tmp_path):
    result, launcher, _ = run(plan_of(), tmp_path, lambda node, replica: "die" if (node, replica) == ("transformer", 0) else "done")
    assert [r.state for r in result.requests] == [State.DONE, State.DONE]
    rerun = next(r for r in result.requests if r.attempt == 1)
    assert any("retrying from the start" in e.detail and "'transformer' replica 0" in e.detail for e in rerun.events)
    assert result.replicas[("transformer", 0)].down in ("process killed by SIGKILL", "dead: no detail")
    assert all(replica == 1 for node, replica, order in launcher.orders if node == "transformer" and order.attempt == 1)


def test_without_another_replica_a_death_fails_the_request_naming_node_replica_and_stage(tmp_path):
    result, _, _ = run(plan_of("wan_t2v.yaml"), tmp_path, lambda node, replica: "die" if node == "transformer" else "done",
                       requests=1)
    (request,) = result.requests
    assert request.state == State.FAILED
    assert request.error.startswith("node 'transformer' replica 0 (stage 'denoise'): ")
    assert request.error.endswith(("process killed by SIGKILL", "dead: no detail"))


def test_a_failed_stage_fails_its_request_with_the_workers_error(tmp_path):
    result, _, _ = run(plan_of("wan_t2v.yaml"), tmp_path, lambda node, replica: "fail" if node == "decoder" else "done",
                       requests=1)
    (request,) = result.requests
    assert request.state == State.FAILED
    assert request.error.startswith("node 'decoder' replica 0 stage 'denoise' failed: RuntimeError: out of memory")


def test_a_segment_past_its_deadline_fails_its_request(tmp_path):
    plan = plan_of("wan_t2v.yaml", "timeouts.stage_s=0.2", "timeouts.transfer_s=0.1")
    result, _, _ = run(plan, tmp_path, lambda node, replica: "silent" if node == "transformer" else "done", requests=1)
    (request,) = result.requests
    assert request.state == State.FAILED
    assert "node 'transformer' did not finish denoise within 0.4 s (timeouts.stage_s)" in request.error


def test_an_answer_from_a_replica_not_dispatched_is_refused(tmp_path):
    plan = plan_of("wan_t2v_two_dit.yaml", "timeouts.stage_s=0.5", "timeouts.transfer_s=0.1")
    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True)
    topics = Topics(options.run_id)

    def behave(node: str, replica: int) -> Behaviour:
        return "silent" if node == "transformer" else "done"

    launcher = FakeLauncher(broker, topics, behave)
    controller = Controller(plan, tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id))

    async def scenario():
        from nodes.wan.family import WanRequest

        running = asyncio.create_task(controller.run([WanRequest(prompt="a cat", seed=1)]))
        while not any(node == "transformer" for node, _, _ in launcher.orders):
            await asyncio.sleep(0.01)
        (dit,) = {replica for node, replica, _ in launcher.orders if node == "transformer"}
        forged = StageDone(request_id="r1", node="transformer", replica=1 - dit, attempt=0, timings={}, edges={},
                           outputs=[], peak_rss_bytes=0)  # signed by the replica it names, which was not asked
        other = Sealer(broker.key, topics.replica_client("transformer", 1 - dit))
        broker.inject(topics.controller, other.seal(topics.controller, forged))
        return await asyncio.wait_for(running, 20)

    result = asyncio.run(scenario())
    (request,) = result.requests
    assert request.state == State.FAILED and "did not finish denoise" in request.error  # the forged answer did not count
    assert result.refused["impostor"] == 1
    assert not any(node == "decoder" for node, _, _ in launcher.orders)


@pytest.mark.parametrize("requests", [5])
def test_requests_in_flight_stay_within_the_edges_slots(tmp_path, requests):
    plan = plan_of("wan_t2v.yaml", "edges.0.slots=1", "edges.1.slots=1")
    result, launcher, controller = run(plan, tmp_path, requests=requests)
    assert controller.scheduler.in_flight_cap == 1
    assert [order.request_id for node, _, order in launcher.orders if node == "encoder"] == [f"r{i + 1}" for i in range(5)]
    # one at a time: each request's decode comes before the next request's encode
    sequence = [(node, order.request_id) for node, _, order in launcher.orders]
    assert sequence.index(("decoder", "r1")) < sequence.index(("encoder", "r2"))
    assert all(r.state == State.DONE for r in result.requests)


def test_a_silent_replica_is_killed_and_its_request_fails_naming_it(tmp_path):
    plan = plan_of("wan_t2v.yaml", "timeouts.heartbeat_s=0.3")  # the fake workers send no heartbeats
    result, launcher, _ = run(plan, tmp_path, lambda node, replica: "silent" if node == "transformer" else "done",
                              requests=1)
    (request,) = result.requests
    assert request.state == State.FAILED
    assert "node 'transformer' replica 0 (stage 'denoise'): stopped responding (no heartbeat" in request.error
    assert ("transformer", 0) in launcher.dead  # killed, so that it does no more harm


def deployed(plan, tmp_path: Path, behave: Callable[[str, int], Behaviour], scenario):
    """Run ``scenario(controller, scheduler, launcher)`` inside a deployment on the memory bus."""
    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True)
    launcher = FakeLauncher(broker, Topics(options.run_id), behave)
    controller = Controller(plan, tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id))

    async def main():
        async with controller.deployed() as scheduler:
            return await asyncio.wait_for(scenario(controller, scheduler, launcher), 20)

    return asyncio.run(main())


def dit_runs_forever(node: str, replica: int) -> Behaviour:
    return "silent" if node == "transformer" else "done"


def test_cancel_drops_a_running_request_on_its_replicas_and_a_queued_one_never_runs(tmp_path):
    from nodes.wan.family import WanRequest

    async def scenario(controller, scheduler, launcher):
        running = scheduler.submit(WanRequest(prompt="a", seed=1))
        queued = scheduler.submit(WanRequest(prompt="b", seed=2))  # one slot per edge: it waits
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        assert queued.request.state == State.QUEUED
        assert scheduler.cancel(queued.request.id, "cancelled by the client").state == State.CANCELLED
        assert scheduler.cancel(running.request.id, "cancelled by the client").state == State.CANCELLED
        assert scheduler.cancel(running.request.id, "again") is None  # ended already
        await controller.serve_until(lambda: len(launcher.cancels) == 2)
        return running.request, queued.request

    plan = plan_of("wan_t2v.yaml", "edges.0.slots=1", "edges.1.slots=1")
    running, queued = deployed(plan, tmp_path, dit_runs_forever, scenario)
    assert running.finished and running.events[-1].detail == "cancelled by the client"
    assert running.runs[-1].outcome == "cancelled"
    assert queued.runs == []  # never dispatched


def test_an_interrupt_ends_the_run_at_its_next_tick_and_stops_every_worker(tmp_path):
    from nodes.wan.family import WanRequest

    launchers = []

    async def scenario(controller, scheduler, launcher):
        launchers.append(launcher)
        scheduler.submit(WanRequest(prompt="a", seed=1))
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        controller.interrupt()  # Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            controller.interrupt()  # a second Ctrl-C does not wait for the tick
        await controller.serve_until(lambda: False)  # only the interrupt ends this

    with pytest.raises(Interrupted):
        deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario)
    (launcher,) = launchers
    assert launcher.tasks and all(task.done() for task in launcher.tasks.values())  # every worker stopped


def test_cancel_tells_the_replicas_of_the_remaining_segments_and_frees_them(tmp_path):
    async def scenario(controller, scheduler, launcher):
        from nodes.wan.family import WanRequest

        handle = scheduler.submit(WanRequest(prompt="a", seed=1))
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        scheduler.cancel(handle.request.id, "cancelled by the client")
        await controller.serve_until(lambda: len(launcher.cancels) == 2)
        return launcher.cancels, {key: info.assigned for key, info in controller.fleet.replicas.items()}

    cancels, assigned = deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario)
    assert sorted(cancels) == [("decoder", 0, "r1"), ("transformer", 0, "r1")]  # not the encoder: it is done
    assert set(assigned.values()) == {0}


def test_a_request_past_its_own_deadline_fails_and_is_dropped(tmp_path):
    async def scenario(controller, scheduler, launcher):
        from nodes.wan.family import WanRequest

        handle = scheduler.submit(WanRequest(prompt="a", seed=1), "job-1", deadline_s=0.3)
        await controller.serve_until(lambda: handle.finished and len(launcher.cancels) == 2)
        return handle.request

    request = deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario)
    assert request.state == State.FAILED and request.error == "not finished within its deadline of 0.3 s"


def test_progress_comes_from_the_denoising_steps_of_the_heartbeats(tmp_path):
    async def scenario(controller, scheduler, launcher):
        from nodes.wan.family import WanRequest

        handle = scheduler.submit(WanRequest(prompt="a", seed=1, steps=8))
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        seen = [handle.request.progress]
        for step in (2, 6):
            scheduler.on_heartbeat(Heartbeat(node="transformer", replica=0, seq=step, request_id="r1", stage="denoise",
                                             step=step, total_steps=8, requests_done=0, rss_bytes=1, rejected=0, time=0.0))
            seen.append(handle.request.progress)
        scheduler.on_heartbeat(Heartbeat(node="transformer", replica=0, seq=9, request_id="other", stage="denoise",
                                         step=8, total_steps=8, requests_done=0, rss_bytes=1, rejected=0, time=0.0))
        seen.append(handle.request.progress)
        return seen

    assert deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario) == [0.0, 0.25, 0.75, 0.75]


def test_a_repeated_answer_of_a_segment_taken_already_is_dropped_not_refused(tmp_path):
    """A replica that answers a resent dispatch again sends its answer twice; the second comes once the request has
    moved on. It is no impostor: dropped, not counted. The same answer from a replica never asked still is."""
    async def scenario(controller, scheduler, launcher):
        from nodes.wan.family import WanRequest

        handle = scheduler.submit(WanRequest(prompt="a", seed=1, steps=4))
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        encoded = StageDone(request_id="r1", node="encoder", replica=0, attempt=0, timings={}, edges={}, outputs=[],
                            peak_rss_bytes=0)
        scheduler.on_answer(encoded)
        assert scheduler.impostors == 0
        scheduler.on_answer(encoded.model_copy(update={"replica": 1}))
        assert scheduler.impostors == 1
        return handle.request

    request = deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario)
    assert request.state == State.RUNNING and request.segment == 1
