"""The deployed replicas of a plan: started through a launcher, watched until they are stopped.

A :class:`Launcher` starts one worker per node replica from its spec and secrets (:class:`LocalLauncher` as
subprocesses here; an agent on another host later) and tells which have exited. The :class:`Fleet` follows
every replica from what it announces (status, heartbeats) and from its process, and takes a replica out of
service when it dies, fails, falls silent or stops making progress; the scheduler learns of it through
:meth:`Fleet.take_down`. While the controller itself is cut off from the broker, silence is not held against
the replicas: their heartbeat clocks restart when the broker is back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.control.heartbeat import LivenessMonitor
from engine.control.messages import Heartbeat, Status
from engine.errors import NodeError
from engine.plan.model import Plan
from engine.runtime.deployment import WorkerSecrets, WorkerSpec
from engine.runtime.progress import ProgressView

ReplicaKey = tuple[str, int]


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

    @property
    def key(self) -> ReplicaKey:
        return (self.node, self.replica)


class Fleet:
    def __init__(self, plan: Plan, launcher: Launcher, view: ProgressView):
        self.plan = plan
        self.launcher = launcher
        self.view = view
        self.replicas = {(n.name, r): ReplicaInfo(n.name, r) for n in plan.nodes.values() for r in range(n.replicas)}
        self.monitor = LivenessMonitor(heartbeat_timeout_s=plan.timeouts.heartbeat_s)
        self._newly_down: list[ReplicaInfo] = []
        self._reconnects_seen = 0

    def launch(self, workers: list[tuple[WorkerSpec, WorkerSecrets]]) -> None:
        for spec, secrets in workers:
            self.launcher.start(spec, secrets)
        self.view.deploying(len(self.replicas))

    # -- what replicas say ------------------------------------------------------------------------------------

    def observe(self, message: Status | Heartbeat) -> None:
        info = self.replicas.get((message.node, message.replica))
        if info is None:
            return
        if isinstance(message, Heartbeat):
            info.rss_bytes = message.rss_bytes
            info.peak_rss_bytes = max(info.peak_rss_bytes, message.rss_bytes)
            info.rejected = message.rejected
            if info.state == "ready":  # silence counts from readiness: loading sends no heartbeats
                self.monitor.observe(message)
            self.view.heartbeat(message)
            return
        if message.state == "dead":  # its will: believed unless heartbeats follow it (see LivenessMonitor)
            self.monitor.observe(message)
            return
        info.state, info.pid = message.state, message.pid
        if message.state == "ready":
            info.load_s, info.param_bytes = message.load_s, message.param_bytes
            info.receives_at = {edge: str(where.get("session") or where.get("segment"))
                                for edge, where in (message.receive_edges or {}).items()}
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
        return True

    def not_ready(self) -> list[str]:
        return [f"{r.node}[{r.replica}] ({r.state})" for r in self.replicas.values() if r.state != "ready"]

    def check(self, *, connected: bool, reconnects: int) -> None:
        """Take out replicas whose process ended, and, while we hear the broker, those silent or stuck."""
        for key, how in self.launcher.exited().items():
            self._down(self.replicas[key], how)
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
        self.view.replica_down(info, why)
        self._newly_down.append(info)

    # -- for the scheduler ------------------------------------------------------------------------------------

    def has_live(self, node: str) -> bool:
        return any(r.down is None for r in self.replicas.values() if r.node == node)

    def pick(self, node: str) -> int:
        """The live replica of ``node`` with the fewest segments assigned (then the lowest index)."""
        live = [r for r in self.replicas.values() if r.node == node and r.down is None]
        if not live:
            raise NodeError("no live replica left", node=node)
        return min(live, key=lambda r: (r.assigned, r.replica)).replica

    def report(self, info: ReplicaInfo, stage: str | None = None, *, named: bool = True) -> str:
        """Why a replica is out, with its log tail; ``named`` puts the node, replica and stage in front."""
        host = self.plan.nodes[info.node].host
        where = (f"node {info.node!r} replica {info.replica}" + (f" on host {host!r}" if host != "local" else "")
                 + (f" (stage {stage!r})" if stage else "") + ": ")
        tail = self.launcher.log_tail(info.key)
        return (where if named else "") + str(info.down) + (f"\n  {tail}" if tail else "")
