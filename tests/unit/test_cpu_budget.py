"""Each worker's share of its host's cores (engine.plan.cpu_budget) and the threads it makes of it (engine.worker.threads)."""

from __future__ import annotations

import pytest

from engine.plan.cpu_budget import budgeted, cpu_shares
from engine.worker.threads import thread_count
from tests.unit.test_runtime_scheduler import plan_of


def test_workers_on_a_host_split_its_cores_by_their_work_and_hosts_apart_do_not_share():
    hosts = {("encoder", 0): "local", ("transformer", 0): "local", ("decoder", 0): "local", ("transformer", 1): "gpu1"}
    shares = cpu_shares(hosts, {("encoder", 0): 0.0, ("transformer", 0): 0.1, ("decoder", 0): 0.9})
    assert shares[("transformer", 1)] == 1.0  # alone on its host (and unmeasured: weight 1)
    assert shares[("decoder", 0)] == pytest.approx(0.9 / 1.01) and shares[("encoder", 0)] == pytest.approx(0.01 / 1.01)
    assert sum(v for k, v in shares.items() if hosts[k] == "local") == pytest.approx(1.0)
    assert cpu_shares(hosts, {})[("encoder", 0)] == pytest.approx(1 / 3)  # nothing measured: evenly


def test_a_node_with_place_threads_takes_no_part_in_the_split():
    plan = plan_of("wan_t2v.yaml", "nodes.decoder.place.threads=3")
    keys = [("encoder", 0), ("transformer", 0), ("decoder", 0)]
    assert set(budgeted(plan, keys)) == {("encoder", 0), ("transformer", 0)}


@pytest.mark.parametrize(("share", "fixed", "cores", "threads"), [
    (0.86, None, 2, 2), (0.47, None, 2, 1), (0.05, None, 2, 1), (1 / 3, None, 16, 5), (0.1, 3, 2, 3)])
def test_a_share_becomes_threads_against_the_hosts_cores_at_least_one(share, fixed, cores, threads):
    assert thread_count(share, fixed, cores) == threads


def test_a_wavering_share_does_not_change_the_threads_at_every_stage(monkeypatch):
    import torch

    from engine.worker import threads

    monkeypatch.setattr(threads, "host_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = []
        budget = threads.TorchThreads(0.25, None)
        for share in (0.76, 0.9, 0.7, 0.76, 0.6):
            budget.share = share
            budget.apply()
            seen.append(torch.get_num_threads())
        assert seen == [1, 2, 2, 2, 1]
        fixed = threads.TorchThreads(0.9, 1)
        fixed.apply()
        assert torch.get_num_threads() == 1  # place.threads holds whatever the share
        off = threads.TorchThreads(0.9, None, budget=False)  # engine run: torch's default, as the pipeline runs
        assert off.start() == 1 and (off.apply() or torch.get_num_threads()) == 1
    finally:
        torch.set_num_threads(before)


def test_a_workers_torch_runs_on_one_thread_in_the_order_given():
    """One compute thread: one OpenMP team in the process (engine.worker.threads), and stages in order."""
    import asyncio
    import threading

    from engine.worker.threads import ComputeThread

    ran: list[tuple[int, int]] = []

    async def scenario() -> None:
        compute = ComputeThread()
        try:
            await asyncio.gather(*(compute.run(lambda i=i: ran.append((i, threading.get_ident()))) for i in range(8)))
        finally:
            compute.close()

    asyncio.run(scenario())
    assert [i for i, _ in ran] == list(range(8))
    assert len({ident for _, ident in ran}) == 1 and ran[0][1] != threading.get_ident()
