"""A service's replicas that die are started again, in process: the controller with a restart policy against the
in-memory bus and the fake launcher of the scheduler's tests (whose restarted workers sign from 0 again)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.control.memory import MemoryBroker
from engine.control.messages import Shutdown
from engine.control.signing import Opener, Rejected, Sealer, new_key
from engine.control.topics import Topics
from engine.controller.controller import Controller, RunOptions
from engine.controller.fleet import RestartPolicy
from engine.controller.tracker import State
from tests.unit.test_runtime_scheduler import Behaviour, FakeLauncher, plan_of

DIT = ("transformer", 0)


def serve(tmp_path: Path, behave: Callable[[FakeLauncher, str, int], Behaviour], policy: RestartPolicy, *overrides: str,
          requests: int = 2):
    """Requests through a one-DiT deployment whose dead replicas restart; returns (result, launcher)."""
    from nodes.wan.family import WanRequest

    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True, restarts=policy)
    launcher = FakeLauncher(broker, Topics(options.run_id), lambda node, replica: behave(launcher, node, replica))
    controller = Controller(plan_of("wan_t2v.yaml", *overrides), tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id))
    requests_made = [WanRequest(prompt="a cat", seed=i) for i in range(requests)]

    async def scenario():
        return await asyncio.wait_for(controller.run(requests_made), 20)

    return asyncio.run(scenario()), launcher


def dit_dies_then(later: Behaviour) -> Callable[[FakeLauncher, str, int], Behaviour]:
    """The DiT's first process dies on its first request; its later processes behave as ``later``."""
    def behave(launcher: FakeLauncher, node: str, replica: int) -> Behaviour:
        if (node, replica) != DIT:
            return "done"
        return "die" if launcher.started.count(DIT) == 1 else later

    return behave


def test_a_dead_replica_is_started_again_and_its_request_reruns_on_it(tmp_path):
    result, launcher = serve(tmp_path, dit_dies_then("done"), RestartPolicy(backoff_s=0.05))
    assert [r.state for r in result.requests] == [State.DONE, State.DONE]
    assert launcher.started.count(DIT) == 2 and result.replicas[DIT].restarts == 1
    assert result.replicas[DIT].down is None and result.replicas[DIT].state == "ready"
    rerun = next(r for r in result.requests if r.attempt == 1)
    assert any("retrying from the start" in e.detail for e in rerun.events)
    # the restarted process signs from sequence number 0 again: its answers counted, none refused as replays
    assert result.refused.get("replayed", 0) == 0


def test_a_crash_loop_stops_restarting_and_fails_the_request_saying_so(tmp_path):
    result, launcher = serve(tmp_path, dit_dies_then("crash"), RestartPolicy(max_restarts=2, backoff_s=0.02), requests=1)
    (request,) = result.requests
    assert request.state == State.FAILED
    assert launcher.started.count(DIT) == 3  # the first process and two restarts, then no more
    assert "restarted 2 times in the last 600 s (a crash loop)" in result.replicas[DIT].down
    assert "no live replica left" in request.error


def test_a_restarted_replica_not_ready_in_time_is_killed(tmp_path):
    result, launcher = serve(tmp_path, dit_dies_then("hang"), RestartPolicy(max_restarts=1, backoff_s=0.02),
                             "timeouts.ready_s=0.3", requests=1)
    assert result.requests[0].state == State.FAILED
    assert result.replicas[DIT].down.startswith("not ready within 0.3 s of its restart (timeouts.ready_s); killed")
    assert DIT in launcher.dead


def test_without_a_policy_a_dead_replica_stays_out(tmp_path):
    """engine run: no restarts; the request fails naming the replica (tests/unit/test_runtime_scheduler.py)."""
    from nodes.wan.family import WanRequest

    broker = MemoryBroker()
    options = RunOptions(out_dir=tmp_path, quiet=True)
    launcher = FakeLauncher(broker, Topics(options.run_id), lambda node, replica: "die" if (node, replica) == DIT else "done")
    controller = Controller(plan_of("wan_t2v.yaml"), tmp_path, options, launcher=launcher,
                            connect=lambda address, client_id, key: broker.connect(client_id))
    result = asyncio.run(asyncio.wait_for(controller.run([WanRequest(prompt="a cat")]), 20))
    assert result.requests[0].state == State.FAILED and launcher.started.count(DIT) == 1


def test_a_receiver_told_of_a_restart_accepts_the_new_process_from_sequence_0():
    key, topic = new_key(), "dge/r/ctl"
    opener = Opener(key)
    old = Sealer(key, "r-transformer-0")
    for _ in range(3):
        opener.open(topic, old.seal(topic, Shutdown(reason="old process")))
    again = Sealer(key, "r-transformer-0").seal(topic, Shutdown(reason="new process"))
    with pytest.raises(Rejected, match="seen before"):
        opener.open(topic, again)
    opener.forget("r-transformer-0")
    assert opener.open(topic, again).message == Shutdown(reason="new process")
