"""Each worker's share of its host's cores: the workers on one host split them by the work each does.

A replica's weight is the share of the time it was busy lately (the controller measures it from heartbeats), at
least :data:`FLOOR` so that an idle worker keeps a thread; before anything is measured every replica weighs the
same. A worker turns its share into torch threads against its host's cores (:mod:`engine.worker.threads`); nodes
with ``place.threads`` are given their fixed count and take no part in the split.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.plan.model import Plan

ReplicaKey = tuple[str, int]
FLOOR = 0.01  #: the least weight a replica has (idle: it keeps one thread, and leaves the cores to the busy)


def cpu_shares(hosts: Mapping[ReplicaKey, str], weights: Mapping[ReplicaKey, float]) -> dict[ReplicaKey, float]:
    """Each replica's fraction of its host's cores, in proportion to its weight among the replicas on that host
    (``hosts``: replica -> host; a replica without a weight weighs 1)."""
    weight = {key: max(FLOOR, weights.get(key, 1.0)) for key in hosts}
    totals: dict[str, float] = {}
    for key, host in hosts.items():
        totals[host] = totals.get(host, 0.0) + weight[key]
    return {key: min(1.0, weight[key] / totals[host]) for key, host in hosts.items()}


def budgeted(plan: Plan, replicas: list[ReplicaKey]) -> dict[ReplicaKey, str]:
    """The replicas that split their host's cores (those of nodes without ``place.threads``), with their host."""
    return {key: plan.nodes[key[0]].host for key in replicas if plan.nodes[key[0]].threads is None}
