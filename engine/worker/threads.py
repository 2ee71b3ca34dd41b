"""A worker's CPU threads: its share of the host's cores, not torch's default of every core.

Workers on one host that each run torch on every core oversubscribe it as soon as two compute at once (OpenMP
threads spinning against each other make every stage several times slower). The controller gives each worker a
share of its host's cores (:mod:`engine.controller.cpu_budget`); the worker turns it into a thread count against
the cores it may run on, at start (intra- and inter-op) and again before a stage when the share changed.

Torch runs on one thread of the worker, its :class:`ComputeThread`. Every thread that runs a parallel region has an
OpenMP team of its own, and once a process's teams together hold more threads than it has cores, libgomp lets them
spin only briefly between regions: they sleep and are woken for each of a model's thousands of small operators (a
tiny VAE decode ran at 1.6 cores of 2 on the same CPU seconds). Workers spin for :data:`SPIN_COUNT` rounds (the
launcher sets ``GOMP_SPINCOUNT``): long enough to bridge the gap between two operators, short enough that a worker
waiting on a core another worker holds gives it back soon.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("engine.worker")
T = TypeVar("T")
#: libgomp's spin rounds before a waiting thread sleeps (about 0.3 ms here; its default, 300000, is about 3 ms and
#: falls to 1000 once the process's threads outnumber its cores)
SPIN_COUNT = 30000
STICKY = 0.15  #: how far past the middle between two thread counts a share must move to change the count


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_count(share: float, fixed: int | None, cores: int | None = None) -> int:
    """Threads for a worker: ``fixed`` (``place.threads``) if set, else its share of the cores, at least one."""
    if fixed is not None:
        return fixed
    return max(1, round(share * (cores or host_cores())))


class TorchThreads:
    """Sets torch's thread counts for the thread that computes, when they are not what they should be."""

    def __init__(self, share: float, fixed: int | None, budget: bool = True):
        self.share = share
        self.fixed = fixed
        self.budget = budget  #: False: torch's default unless ``fixed`` (a run that must equal the pipeline bit for bit)

    @property
    def wanted(self) -> int:
        return thread_count(self.share, self.fixed)

    def start(self) -> int:
        """At the process's start, before any parallel work: intra-op and inter-op threads."""
        import torch

        if not self.budget and self.fixed is None:
            return torch.get_num_threads()
        count = self.wanted
        torch.set_num_threads(count)
        torch.set_num_interop_threads(count)
        log.info("torch threads: %d (%s)", count, "place.threads" if self.fixed is not None else
                 f"a share of {self.share:.2f} of {host_cores()} cores")
        return count

    def apply(self) -> None:
        """In the computing thread, before a stage: follow a changed share (inter-op threads stay as started), once
        it is ``STICKY`` past the middle between the current count and the next: a share that wavers around that
        middle would otherwise change the count at every stage."""
        import torch

        current = torch.get_num_threads()
        if not self.budget or self.fixed is not None or abs(self.share * host_cores() - current) <= 0.5 + STICKY:
            return
        count = self.wanted
        if count != current:
            torch.set_num_threads(count)
            log.info("torch threads: %d (a share of %.2f of %d cores)", count, self.share, host_cores())


class ComputeThread:
    """The one thread on which a worker runs torch: loading, stages, turning outputs into files."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the compute thread, after what was given to it before."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """No more work; what runs now finishes on its own (a stage cannot be interrupted)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
