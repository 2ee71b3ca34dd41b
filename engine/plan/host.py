"""This host's devices: which exist and how much memory each has, and the check that every ``host: local``
node names one that exists.

torch is imported only to look at cuda and xpu devices, so a graph placed on ``cpu`` alone is checked
without it.
"""

from __future__ import annotations

import os

from engine.errors import Problem, PlanError
from engine.plan.check import CheckedGraph

#: Device kinds besides cpu, as a graph names them, and as a user reads them.
ACCELERATORS = {"cuda": "CUDA", "xpu": "XPU"}


def device_count(kind: str) -> int:
    """Devices of ``kind`` (cuda, xpu) this host has; 0 where torch has no such backend or it is unavailable."""
    import torch

    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def local_devices() -> list[str]:
    """Every device a node on this host may name: cpu, then cuda:N and xpu:N in order."""
    return ["cpu", *(f"{kind}:{i}" for kind in ACCELERATORS for i in range(device_count(kind)))]


def local_capacity(device: str) -> int | None:
    """Total memory of ``device`` on this host; None for a device this host does not have."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    kind, _, index = device.partition(":")
    if int(index) >= device_count(kind):
        return None
    import torch

    return getattr(torch, kind).get_device_properties(int(index)).total_memory


def local_free(device: str) -> int | None:
    """Memory free on ``device`` now (MemAvailable for cpu); None for a device this host does not have."""
    if device == "cpu":
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    kind, _, index = device.partition(":")
    if int(index) >= device_count(kind):
        return None
    import torch

    return int(getattr(torch, kind).mem_get_info(int(index))[0])


def check_local_devices(checked: CheckedGraph) -> None:
    """Raise PlanError naming every ``host: local`` node whose device this host does not have (a run would
    otherwise fail in the node's worker, after the others have loaded)."""
    lines = checked.loaded.lines
    problems = []
    for name, node in checked.loaded.spec.nodes.items():
        place = node.place
        if place.host != "local":
            continue
        field = "devices" if place.devices else "device"
        for device in dict.fromkeys(place.all_devices):
            if device == "cpu":
                continue
            kind, _, index = device.partition(":")
            count = device_count(kind)
            if int(index) >= count:
                where = lines.problem(("nodes", name, "place", field), "")
                problems.append(Problem(where.file, where.line, f"node {name!r} place.{field} {device}",
                                        f"this host has {count} {ACCELERATORS[kind]} device{'s' if count != 1 else ''} "
                                        f"(valid here: {', '.join(local_devices())})"))
    if problems:
        raise PlanError("the graph places nodes on devices this host does not have:\n"
                        + "\n".join(f"  {problem}" for problem in problems))
