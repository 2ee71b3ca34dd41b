"""The controller's side of an elastic deployment: replicas that follow the load, and each worker's CPU share.

The :class:`Autoscaler` feeds every heartbeat into a :class:`~engine.controller.scaling.LoadWindow`. Every
``TICK_S`` it asks the policy (:func:`~engine.controller.scaling.decide`) about each elastic node, when scaling is
on, and returns the decisions for the controller to carry out (start a replica, drain one); each is recorded as a
:class:`ScaleEvent` (log, the service's page and ``/metrics``), with where a new replica went
(:mod:`engine.controller.placing`), or that it found no room: then nothing starts and the node's next scale-out
waits a cooldown. For a node on this host's CPU it counts the cores its workers leave idle (the policy scales such a
node out on its busy share only with a core to spare). It also keeps the workers' shares of their host's
cores in step with the work each does (:mod:`engine.plan.cpu_budget`): :meth:`Autoscaler.shares` after a change of
replicas, and every ``REBALANCE_S`` otherwise, the controller tells the workers whose share moved. The shares are
measured over the whole window, so they move slowly; looking often matters at the start, when every worker has the
same share until the first requests show which does the work (a fresh service's decoder would otherwise decode on
one thread of two for a whole window).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.control.messages import Heartbeat
from engine.controller.fleet import Fleet, ReplicaKey
from engine.controller.scaling import Decision, LoadWindow, NodeState, Sample, decide
from engine.plan.cpu_budget import budgeted, cpu_shares
from engine.plan.model import Plan
from engine.worker.threads import host_cores, thread_count

log = logging.getLogger("engine.scaling")

TICK_S = 0.5  #: how often the policy looks
SHARE_STEP = 0.05  #: a worker is told of its new share when it moved at least this much
REBALANCE_S = 2.0  #: how often the shares are looked at (the window, if shorter)
EVENTS_KEPT = 100


@dataclass(frozen=True)
class ScaleEvent:
    time: float  #: wall clock
    node: str
    direction: str
    reason: str  #: busy, queue, idle, or no_room (a scale-out that found no device with room: nothing started)
    detail: str
    replica: int | None  #: the replica started (out) or drained (in); None: none (no room)


class Autoscaler:
    def __init__(self, plan: Plan, fleet: Fleet, *, scaling: bool, cpu_budget: bool = True,
                 clock: Callable[[], float] = time.monotonic, cores: Callable[[], int] = host_cores):
        self.plan = plan
        self.fleet = fleet
        self.scaling = scaling  #: False: elastic nodes keep their ``min`` replicas (``engine serve --autoscale off``)
        self.cpu_budget = cpu_budget  #: workers' threads are their shares of the cores; False: every core each
        self.cores = cores  #: this host's cores
        self.clock = clock
        self.window = LoadWindow(max(plan.scaling.window_s, plan.scaling.in_window_s))
        self.events: deque[ScaleEvent] = deque(maxlen=EVENTS_KEPT)
        self.counts: Counter[tuple[str, str, str]] = Counter()  #: (node, direction, reason) -> decisions
        self.elastic = [n.name for n in plan.nodes.values() if n.max_replicas is not None]
        self._changed_at: dict[str, float] = {}
        self._no_room_until: dict[str, float] = {}  #: nodes whose last scale-out found no room: not before then
        self._next_tick = 0.0
        self._next_rebalance = 0.0
        self.sent: dict[ReplicaKey, float] = {}  #: the share each worker was last given

    def started(self, shares: dict[ReplicaKey, float]) -> None:
        """The deployment is ready with these shares: the nodes' counts date from now."""
        now = self.clock()
        self._changed_at = {node: now for node in self.plan.nodes}
        self.sent = dict(shares)
        self._next_rebalance = now + self._rebalance_s

    @property
    def _rebalance_s(self) -> float:
        return min(REBALANCE_S, self.plan.scaling.window_s)

    def observe(self, beat: Heartbeat) -> None:
        self.window.observe(beat.node, beat.replica, Sample(self.clock(), beat.busy_s, beat.waiting))

    def decisions(self) -> list[Decision]:
        """What the policy decides now for each elastic node (nothing between ticks or with scaling off)."""
        now = self.clock()
        if not self.scaling or now < self._next_tick or not self._changed_at:
            return []
        self._next_tick = now + TICK_S
        found = []
        for node in self.elastic:
            serving, warming, draining = self.fleet.counts(node)
            planned = self.plan.nodes[node]
            state = NodeState(serving, warming, draining, planned.replicas, planned.most_replicas,
                              self._changed_at[node], self.spare_cores(node, now))
            replicas = [r.replica for r in self.fleet.replicas.values()
                        if r.node == node and r.down is None and r.state == "ready" and not r.draining]
            policy = self.plan.scaling
            decision = decide(node, state, self.window.load(node, replicas, state.changed_at, now, policy.window_s),
                              self.window.load(node, replicas, state.changed_at, now, policy.in_window_s), policy, now)
            if decision is not None and not (decision.direction == "out" and now < self._no_room_until.get(node, 0.0)):
                found.append(decision)
        return found

    def spare_cores(self, node: str, now: float) -> float | None:
        """For a node on this host's CPU: the cores its workers would leave idle with the shares the window's work
        gives them (each worker's threads times its busy share, taken from the host's cores); None for other nodes.
        The shares are those of the next re-balance, not the last: a node busy now gets the cores the others leave,
        and a second replica would only split them."""
        if self.plan.nodes[node].device != "cpu" or self.plan.nodes[node].host != "local":
            return None
        cores = self.cores()
        shares = self.shares() if self.cpu_budget else {}
        used = 0.0
        for key, info in self.fleet.replicas.items():
            if info.down is None and self.fleet.where(info) == ("local", "cpu"):
                fixed = self.plan.nodes[info.node].threads
                threads = thread_count(shares.get(key, 1.0), fixed, cores) if self.cpu_budget else fixed or cores
                used += threads * (self.window.busy_share(*key, now - self.plan.scaling.window_s) or 0.0)
        return cores - used

    def record(self, decision: Decision, replica: int, where: str = "") -> None:
        """A decision carried out on ``replica`` (``where``: why there, for a scale-out): its node's count changed
        now."""
        self._changed_at[decision.node] = self.clock()
        detail = f"{decision.detail}; {where}" if where else decision.detail
        self._event(ScaleEvent(time.time(), decision.node, decision.direction, decision.reason, detail, replica))
        log.info("%s%s (replica %d)", decision, f"; {where}" if where else "", replica)
        if decision.direction == "in":
            self.window.forget(decision.node, replica)

    def no_room(self, decision: Decision, why: str) -> None:
        """A scale-out that found no device with room (``why``): nothing started; the node's next scale-out waits
        a cooldown."""
        self._no_room_until[decision.node] = self.clock() + self.plan.scaling.cooldown_s
        self._event(ScaleEvent(time.time(), decision.node, "out", "no_room", f"{decision.detail}; {why}", None))
        log.warning("%s; %s: not scaled out", decision, why)

    def _event(self, event: ScaleEvent) -> None:
        self.counts[(event.node, event.direction, event.reason)] += 1
        self.events.append(event)

    def share_of_new(self, key: ReplicaKey) -> float:
        """The share a replica about to start gets: weighed as the mean of its node's replicas (it counts as told)."""
        self.sent[key] = share = self.shares(extra=key).get(key, 1.0)
        return share

    def shares(self, extra: ReplicaKey | None = None) -> dict[ReplicaKey, float]:
        """Every budgeted replica's share of its host's cores (and ``extra``'s, about to start), by the busy share
        each had over the window."""
        now = self.clock()
        keys = [key for key, info in self.fleet.replicas.items() if info.down is None and not info.draining]
        weights = {key: share for key in keys
                   if (share := self.window.busy_share(*key, now - self.plan.scaling.window_s)) is not None}
        if extra is not None:
            keys.append(extra)
            mates = [weights[k] for k in weights if k[0] == extra[0]]
            if mates:
                weights[extra] = sum(mates) / len(mates)
        if len(weights) < len(keys):  # not all measured: the unmeasured weigh as the mean of the measured
            mean = sum(weights.values()) / len(weights) if weights else 1.0
            weights = {key: weights.get(key, mean) for key in keys}
        return cpu_shares(budgeted(self.plan, keys), weights)

    def moved_shares(self, force: bool = False) -> dict[ReplicaKey, float]:
        """Shares that moved by ``SHARE_STEP`` or more since each worker was told, every ``REBALANCE_S`` (or now
        with ``force``, after a change of replicas); they count as told."""
        now = self.clock()
        if not self._changed_at or (not force and now < self._next_rebalance):
            return {}
        self._next_rebalance = now + self._rebalance_s
        moved = {key: share for key, share in self.shares().items()
                 if abs(share - self.sent.get(key, 0.0)) >= SHARE_STEP}
        self.sent.update(moved)
        return moved
