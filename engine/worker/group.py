"""A replica on several devices: rank 0 (the worker) and its follower ranks, one process per device.

Rank 0 is the replica's face: it alone speaks on the control plane and holds the node's edges. It starts the other
ranks as its own children (``python -m engine.worker.rank``; they die with it, and stop when its pipe to them
closes), and all ranks join one ``torch.distributed`` group (gloo on CPU, NCCL on CUDA, XCCL on XPU) through a
store rank 0 opens on a free loopback port, with a finite timeout on every collective. For each request of a split
stage rank 0 tells the followers which stage and request (a JSON line on their standard input: an idle follower
waits there, not in a collective) and broadcasts the stage's input tensors; every rank then runs the stage on its
share (:class:`engine.parallel.Split`), and at every step rank 0 broadcasts whether to go on, so a cancelled
request stops on all ranks at the same step.

A rank that dies or hangs breaks the group: the collective that waited for it fails within the timeout, the
request fails naming the rank and its device, and the worker stops so that whoever started it starts the whole
group again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.errors import NodeError
from engine.parallel import Split, rank_layout
from engine.spec.schema import Parallel
from engine.worker.contract import WorkerSpec
from engine.worker.launcher import SETPRIV, exit_description

log = logging.getLogger("engine.worker.group")

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}
STORE_HOST = "127.0.0.1"  #: every rank of a group runs on one host
JOIN_TIMEOUT_S = 600.0  #: ranks load their weights before they join: allow for a large model


class GroupBroken(NodeError):
    """A rank of the group died or stopped answering: the group cannot compute any more."""


@dataclass(frozen=True)
class Work:
    """What rank 0 tells its followers before a split stage: the stage, the request, the tensors that follow."""

    stage: str
    request: dict[str, Any]
    tensors: list[tuple[str, str, list[int]]]  #: name, dtype, shape, in broadcast order
    threads: int  #: rank 0's torch threads: every rank computes with as many (on CPU the count can change results)

    def line(self) -> bytes:
        return json.dumps({"stage": self.stage, "request": self.request, "tensors": self.tensors,
                           "threads": self.threads}).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Work:
        data = json.loads(line)
        return cls(data["stage"], data["request"], [(n, d, list(s)) for n, d, s in data["tensors"]], data["threads"])


def join_group(devices: tuple[str, ...], parallel: Parallel, rank: int, port: int, timeout_s: float,
               store: Any = None) -> Split:
    """Join the replica's process group as ``rank`` and make the CFG and Ulysses subgroups; this rank's Split.
    ``timeout_s`` bounds every collective."""
    import torch
    import torch.distributed as dist

    device = devices[rank]
    kind = device.partition(":")[0]
    if kind == "cuda":
        torch.cuda.set_device(torch.device(device))
    world = len(devices)
    if store is None:
        store = dist.TCPStore(STORE_HOST, port, world, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    # Ranks arrive as their weights finish loading: meet first under the long timeout, so that the group's own (short,
    # for collectives) timeout only ever waits for ranks that are already there.
    store.set(f"loaded/{rank}", "1")
    store.wait([f"loaded/{r}" for r in range(world)], timedelta(seconds=JOIN_TIMEOUT_S))
    dist.init_process_group(BACKENDS[kind], store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    cfg_ranks, ulysses_ranks = rank_layout(parallel.cfg, parallel.ulysses)
    cfg_groups = [dist.new_group(ranks) for ranks in cfg_ranks]  # every rank makes every group, in one order
    ulysses_groups = [dist.new_group(ranks) for ranks in ulysses_ranks]
    branch, shard = divmod(rank, parallel.ulysses)
    return Split(cfg=parallel.cfg, cfg_rank=branch, ulysses=parallel.ulysses, ulysses_rank=shard,
                 cfg_group=cfg_groups[shard], ulysses_group=ulysses_groups[branch])


def open_store(world: int) -> Any:
    """Rank 0's rendezvous for a group: a store on a free loopback port (its ``port`` tells the other ranks)."""
    import torch.distributed as dist

    return dist.TCPStore(STORE_HOST, 0, world, is_master=True, timeout=timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)


def broadcast_tensors(tensors: Mapping[str, Any], device: str) -> dict[str, Any]:
    """Rank 0's side of handing over a stage's inputs (the followers' is :func:`receive_tensors`)."""
    import torch.distributed as dist

    moved = {name: tensor.to(device).contiguous() for name, tensor in tensors.items()}
    for tensor in moved.values():
        dist.broadcast(tensor, src=0)
    return moved


def receive_tensors(work: Work, device: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    tensors = {}
    for name, dtype, shape in work.tensors:
        tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensors[name], src=0)
    return tensors


def step_agreed(go_on: bool, device: str) -> bool:
    """Rank 0 says whether the stage goes on after this step; every rank returns its word."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if go_on else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class RankGroup:
    """Rank 0's view of its group: the follower processes, and the handover of work to them."""

    def __init__(self, spec: WorkerSpec, followers: dict[int, subprocess.Popen], store: Any):
        self.spec = spec
        self.followers = followers
        self.store = store
        self.split: Split | None = None

    @classmethod
    def start(cls, spec: WorkerSpec, spec_path: Path) -> RankGroup:
        """Open the group's store and start ranks 1..N-1; they load their weights while rank 0 loads its own."""
        if SETPRIV is None:
            raise NodeError("setpriv (util-linux) is not installed: without it ranks could outlive their worker")
        world = len(spec.devices)
        store = open_store(world)
        followers = {}
        for rank in range(1, world):
            followers[rank] = subprocess.Popen(
                [SETPRIV, "--pdeathsig", "KILL", sys.executable, "-m", "engine.worker.rank", str(spec_path), str(rank),
                 str(store.port)],
                stdin=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.info("started ranks 1-%d of %s[%d] on %s", world - 1, spec.node, spec.replica, ", ".join(spec.devices[1:]))
        return cls(spec, followers, store)

    def join(self) -> Split:
        spec = self.spec
        self.split = join_group(spec.devices, spec.parallel, 0, self.store.port, spec.collective_timeout_s, self.store)
        log.info("group of %d ranks joined (cfg %d x ulysses %d)", len(self.spec.devices), self.spec.parallel.cfg,
                 self.spec.parallel.ulysses)
        return self.split

    # -- work ---------------------------------------------------------------------------------------------------

    def hand_over(self, stage: str, request: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Tell every follower to run ``stage`` for ``request`` and broadcast its inputs; the inputs on rank 0's
        device."""
        import torch

        work = Work(stage, request, [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in tensors.items()],
                    torch.get_num_threads())
        for rank, process in self.followers.items():
            try:
                assert process.stdin is not None
                process.stdin.write(work.line())
                process.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise self.broken(exc) from exc
        return broadcast_tensors(tensors, self.spec.device)

    def step(self, go_on: bool) -> None:
        step_agreed(go_on, self.spec.device)

    # -- health -------------------------------------------------------------------------------------------------

    def dead_rank(self) -> str | None:
        """What became of the first follower that is gone or stopped, None while all run."""
        for rank, process in self.followers.items():
            code = process.poll()
            if code is not None:
                return self._rank_name(rank) + f" {exit_description(code)}"
            if _stopped(process.pid):
                return self._rank_name(rank) + " is stopped (SIGSTOP) and does not answer"
        return None

    def broken(self, cause: BaseException) -> GroupBroken:
        """The error for a failed collective or handover: the rank that died, when one did (its exit takes a moment
        to show after the connection broke)."""
        deadline = time.monotonic() + 2.0
        while (dead := self.dead_rank()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if dead is None:
            dead = f"a rank of {self.spec.node}[{self.spec.replica}] did not answer ({cause})"
        return GroupBroken(dead)

    def _rank_name(self, rank: int) -> str:
        return f"rank {rank} of {self.spec.node}[{self.spec.replica}] on {self.spec.devices[rank]}"

    def close(self) -> None:
        """Close the followers' pipe (they stop) and make sure they are gone."""
        for process in self.followers.values():
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + 3.0
        for process in self.followers.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False
