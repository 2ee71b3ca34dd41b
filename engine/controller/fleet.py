"""The deployed replicas of a plan: started through a launcher, watched until they are stopped.

A :class:`Launcher` starts one worker per node replica from its spec and secrets (:class:`LocalLauncher` as
subprocesses here; an agent on another host later) and tells which have exited. The :class:`Fleet` follows
every replica from what it announces (status, heartbeats) and from its process, and takes a replica out of
service when it dies, fails, falls silent or stops making progress; the scheduler learns of it through
:meth:`Fleet.take_down`. While the controller itself is cut off from the broker, silence is not held against
the replicas: their heartbeat clocks restart when the broker is back.

With a :class:`RestartPolicy` (a service), a replica taken out is started again from its spec after a backoff that
doubles with each restart, unless it was restarted ``max_restarts`` times within ``window_s`` (a crash loop: it
stays out, and says why). Until it is ready again its node counts as live but not serving: requests wait for it
rather than fail. One that is not ready within ``timeouts.ready_s`` is taken out again.

An elastic node (``replicas: {min, max}``) gains replicas with :meth:`Fleet.add` (started like a restart: serving
once ready; on the host and device the controller's placer chose, :mod:`engine.controller.placing`) and loses them by a drain: :meth:`Fleet.drain` takes a replica out of dispatch, it finishes the
segments it was given or promised, and :meth:`Fleet.retire_drained` hands it back for the controller to stop; its
process's exit is then no failure. Nothing it was given is lost or run twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.control.heartbeat import LivenessMonitor
from engine.control.messages import Heartbeat, Status
from engine.errors import NodeError
from engine.plan.model import Plan
from engine.worker.contract import WorkerSecrets, WorkerSpec
from engine.controller.progress import ProgressView

ReplicaKey = tuple[str, int]
#: The spec and secrets of any replica of any node, given its share of its host's cores and its device (None: its
#: node's).
WorkerMaker = Callable[[str, int, float, str | None], tuple[WorkerSpec, WorkerSecrets]]
RETIRE_GRACE_S = 10.0  #: a retired replica told to stop that has not exited after this long is killed


class Launcher(Protocol):
    """Starts and stops the worker processes of node replicas."""

    def start(self, spec: WorkerSpec, secrets: WorkerSecrets) -> None: ...

    def exited(self) -> dict[ReplicaKey, str]:
        """Replicas whose process has ended, with how (e.g. 'process killed by SIGKILL')."""

    def kill(self, key: ReplicaKey) -> None:
        """End a replica's process at once (it is stuck and must do no more harm)."""

    def stop_all(self) -> None:
        """Stop every process, gracefully first; nothing is left running when this returns."""

    def log_tail(self, key: ReplicaKey) -> str:
        """The last lines a replica logged, introduced by where the log is; empty if none."""


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3  #: restarts of one replica within ``window_s`` after which it stays out
    window_s: float = 600.0
    backoff_s: float = 1.0  #: before the first restart; doubled for each restart within the window


@dataclass
class ReplicaInfo:
    node: str
    replica: int
    state: str = "starting"
    pid: int | None = None
    load_s: float | None = None
    param_bytes: int | None = None
    peak_rss_bytes: int = 0
    rss_bytes: int = 0
    down: str | None = None  #: why it is out of service
    assigned: int = 0  #: segments dispatched or promised to it and not finished
    rejected: int = 0  #: control messages it refused (from its heartbeats)
    receives_at: dict[str, str] = field(default_factory=dict)  #: inbound edge -> where senders write (ip:port)
    restarts: int = 0  #: times it was started again
    added: bool = False  #: started by a scale-out, not with the deployment
    draining: bool = False  #: taken out of dispatch: it finishes what it has, then it is stopped
    where: tuple[str, str] | None = None  #: (host, device) a scale-out placed it on; None: its node's place

    @property
    def key(self) -> ReplicaKey:
        return (self.node, self.replica)


class Fleet:
    def __init__(self, plan: Plan, launcher: Launcher, view: ProgressView, *, restarts: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.plan = plan
        self.launcher = launcher
        self.view = view
        self.restarts = restarts
        self.clock = clock
        self.replicas = {(n.name, r): ReplicaInfo(n.name, r) for n in plan.nodes.values() for r in range(n.replicas)}
        self.monitor = LivenessMonitor(heartbeat_timeout_s=plan.timeouts.heartbeat_s)
        self._newly_down: list[ReplicaInfo] = []
        self._reconnects_seen = 0
        self._workers: dict[ReplicaKey, tuple[WorkerSpec, WorkerSecrets]] = {}
        self._deployed = False  #: every replica was ready once: later readiness is a restart's
        self._restart_at: dict[ReplicaKey, float] = {}  #: replicas to start again, when
        self._restarted: dict[ReplicaKey, list[float]] = {}  #: when each replica was started again
        self._starting_since: dict[ReplicaKey, float] = {}  #: restarted or added replicas not ready yet, since when
        self._retiring: dict[ReplicaKey, float] = {}  #: drained replicas told to stop, killed if still there by then
        self._make: WorkerMaker | None = None

    def launch(self, make: WorkerMaker, shares: dict[ReplicaKey, float]) -> None:
        """Start the plan's replicas, each with its share of its host's cores (1.0 if not given); ``make`` also
        makes the workers of later scale-outs."""
        self._make = make
        for key in self.replicas:
            self._start(key, shares.get(key, 1.0), None)
        self.view.deploying(len(self.replicas))

    def _start(self, key: ReplicaKey, share: float, device: str | None) -> None:
        assert self._make is not None
        self._workers[key] = self._make(*key, share, device)
        self.launcher.start(*self._workers[key])

    # -- what replicas say ------------------------------------------------------------------------------------

    def observe(self, message: Status | Heartbeat) -> None:
        info = self.replicas.get((message.node, message.replica))
        if info is None:
            return
        if isinstance(message, Heartbeat):
            info.rss_bytes = message.rss_bytes
            info.peak_rss_bytes = max(info.peak_rss_bytes, message.rss_bytes)
            info.rejected = message.rejected
            if info.state == "ready" and info.down is None:  # silence counts from readiness: loading sends none
                self.monitor.observe(message)
            self.view.heartbeat(message)
            return
        if message.state == "dead":  # its will: believed unless heartbeats follow it (see LivenessMonitor)
            # Only of a replica in service: not one taken out, nor the process a restart replaces.
            if info.down is None and not (info.restarts and info.state != "ready"):
                self.monitor.observe(message)
            return
        info.state, info.pid = message.state, message.pid
        if message.state == "ready":
            info.load_s, info.param_bytes = message.load_s, message.param_bytes
            info.receives_at = {edge: str(where.get("session") or where.get("segment"))
                                for edge, where in (message.receive_edges or {}).items()}
            if self._starting_since.pop(info.key, None) is not None:
                self.monitor.expect(info.node, info.replica)
                if info.added:
                    self.view.replica_added(info)
                else:
                    self.view.replica_back(info)
        if message.state == "failed":
            self._down(info, f"failed: {message.detail or 'no detail'}")

    # -- readiness and trouble --------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True once every replica announced ready; NodeError as soon as one is out."""
        failed = next((r for r in self.replicas.values() if r.down is not None), None)
        if failed is not None:
            raise NodeError(self.report(failed, named=False), node=failed.node, replica=failed.replica)
        if not all(r.state == "ready" for r in self.replicas.values()):
            return False
        for info in self.replicas.values():
            self.monitor.expect(info.node, info.replica)
        self._deployed = True
        return True

    def not_ready(self) -> list[str]:
        return [f"{r.node}[{r.replica}] ({r.state})" for r in self.replicas.values() if r.state != "ready"]

    def check(self, *, connected: bool, reconnects: int) -> None:
        """Take out replicas whose process ended, restarted ones not ready in time, and, while we hear the broker,
        those silent or stuck."""
        now = self.clock()
        for key, how in self.launcher.exited().items():
            if key in self.replicas:
                self._down(self.replicas[key], how)
            else:  # retired: its exit is what it was told to do
                self._retiring.pop(key, None)
        for key, deadline in list(self._retiring.items()):
            if now > deadline:
                del self._retiring[key]
                self.launcher.kill(key)
        for key, since in list(self._starting_since.items()):
            if now - since > self.plan.timeouts.ready_s:
                self.launcher.kill(key)
                info = self.replicas[key]
                start = "restart" if info.restarts else "start"
                self._down(info, f"not ready within {self.plan.timeouts.ready_s:g} s of its {start} (timeouts.ready_s); killed")
        if not connected:
            return  # cut off from the broker ourselves: the replicas' silence says nothing about them
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self.monitor.restart_clocks()
            self.view.broker_back()
        for trouble in self.monitor.check():
            info = self.replicas.get((trouble.node, trouble.replica))
            if info is not None and info.down is None:
                self.launcher.kill(info.key)  # gone or stuck: make sure it does no more harm
                self._down(info, trouble.detail if trouble.problem == "dead" else f"stopped responding ({trouble.detail}); killed")

    def take_down(self) -> list[ReplicaInfo]:
        """Replicas taken out of service since the last call."""
        down, self._newly_down = self._newly_down, []
        return down

    def _down(self, info: ReplicaInfo, why: str) -> None:
        if info.down is not None:
            return
        info.down = why
        self.monitor.forget(info.node, info.replica)
        self._starting_since.pop(info.key, None)
        self.view.replica_down(info, why)
        self._newly_down.append(info)
        if self.restarts is not None and self._deployed and not info.draining:
            self._plan_restart(info)

    # -- restarts ---------------------------------------------------------------------------------------------

    def _plan_restart(self, info: ReplicaInfo) -> None:
        now = self.clock()
        policy = self.restarts
        assert policy is not None
        recent = [t for t in self._restarted.get(info.key, []) if now - t < policy.window_s]
        self._restarted[info.key] = recent
        if len(recent) >= policy.max_restarts:
            info.down += (f"; not restarted: it was restarted {len(recent)} times in the last {policy.window_s:g} s "
                          "(a crash loop)")
            self.view.replica_left_down(info, len(recent), policy.window_s)
            return
        delay = policy.backoff_s * 2 ** len(recent)
        self._restart_at[info.key] = now + delay
        self.view.replica_restarting(info, delay)

    def due_restarts(self) -> list[ReplicaKey]:
        """Replicas whose restart is due now (the controller restarts them with :meth:`restart`)."""
        now = self.clock()
        return [key for key, at in self._restart_at.items() if at <= now]

    def restart(self, key: ReplicaKey) -> None:
        """Start a replica that was taken out again, from its spec: it is live, and serves once ready."""
        del self._restart_at[key]
        now = self.clock()
        self._restarted.setdefault(key, []).append(now)
        old = self.replicas[key]
        self.replicas[key] = ReplicaInfo(old.node, old.replica, restarts=old.restarts + 1,
                                         peak_rss_bytes=old.peak_rss_bytes, added=old.added, where=old.where)
        self._starting_since[key] = now
        self.monitor.forget(*key)  # what was heard of the old process says nothing of the new one
        self.launcher.start(*self._workers[key])

    # -- elastic nodes ----------------------------------------------------------------------------------------

    def free_replica(self, node: str) -> int:
        """The lowest replica index of ``node`` not in use (nor still stopping): the next scale-out's."""
        used = {r for (n, r) in [*self.replicas, *self._retiring] if n == node}
        return next(i for i in range(len(used) + 1) if i not in used)

    def add(self, key: ReplicaKey, share: float, where: tuple[str, str] | None = None) -> None:
        """Start a new replica (a scale-out) with ``share`` of its host's cores, on ``where`` (host, device; None: its
        node's place); it serves once ready."""
        self.replicas[key] = ReplicaInfo(*key, added=True, where=where)
        self._starting_since[key] = self.clock()
        self.monitor.forget(*key)
        self._start(key, share, where[1] if where is not None else None)

    def drain(self, key: ReplicaKey) -> None:
        """Give a replica no more work; once it has finished what it has, :meth:`retire_drained` hands it back."""
        self.replicas[key].draining = True

    def retire_drained(self) -> list[ReplicaInfo]:
        """Draining replicas with nothing left to do (or out of service), no longer part of the fleet; the caller
        tells each to stop, and one still there after ``RETIRE_GRACE_S`` is killed."""
        done = [info for info in self.replicas.values() if info.draining and (info.assigned == 0 or info.down is not None)]
        for info in done:
            del self.replicas[info.key]
            self.monitor.forget(*info.key)
            self._starting_since.pop(info.key, None)
            self._restart_at.pop(info.key, None)
            self._retiring[info.key] = self.clock() + RETIRE_GRACE_S
        return done

    def counts(self, node: str) -> tuple[int, int, int]:
        """(serving, warming, draining) replicas of ``node``: ready and in service; started and not ready; draining."""
        infos = [r for r in self.replicas.values() if r.node == node and r.down is None]
        return (sum(r.state == "ready" and not r.draining for r in infos),
                sum(r.state != "ready" for r in infos), sum(r.draining for r in infos))

    # -- for the scheduler ------------------------------------------------------------------------------------

    def has_live(self, node: str) -> bool:
        """Whether ``node`` has a replica in service, or one that is being restarted."""
        return any(r.down is None or r.key in self._restart_at for r in self.replicas.values() if r.node == node)

    def serving(self, node: str) -> bool:
        """Whether ``node`` has a replica in service and ready now (not one still starting after a restart)."""
        return any(r.down is None and r.state == "ready" for r in self.replicas.values() if r.node == node)

    def pick(self, node: str) -> int:
        """The ready replica of ``node`` in service and not draining with the fewest segments assigned (then the
        lowest index)."""
        live = [r for r in self.replicas.values()
                if r.node == node and r.down is None and r.state == "ready" and not r.draining]
        if not live:
            raise NodeError("no replica ready: it is being started again" if self.has_live(node) else
                            "no live replica left", node=node)
        return min(live, key=lambda r: (r.assigned, r.replica)).replica

    def where(self, info: ReplicaInfo) -> tuple[str, str]:
        """(host, device) the replica runs on."""
        return info.where or (self.plan.nodes[info.node].host, self.plan.nodes[info.node].device)

    def report(self, info: ReplicaInfo, stage: str | None = None, *, named: bool = True) -> str:
        """Why a replica is out, with its log tail; ``named`` puts the node, replica and stage in front."""
        host = self.where(info)[0]
        where = (f"node {info.node!r} replica {info.replica}" + (f" on host {host!r}" if host != "local" else "")
                 + (f" (stage {stage!r})" if stage else "") + ": ")
        tail = self.launcher.log_tail(info.key)
        return (where if named else "") + str(info.down) + (f"\n  {tail}" if tail else "")
