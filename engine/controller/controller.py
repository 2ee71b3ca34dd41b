"""The controller: deploy the plan's workers, run requests through them, tear everything down, never hang.

Two parts do the work: the :class:`~engine.controller.fleet.Fleet` places one worker per node replica through a
launcher and watches them; the :class:`~engine.controller.scheduler.Scheduler` walks requests through the plan's
segments. The controller owns what they share: the broker (embedded, or the graph's), the run's control
client and access (signing key, broker users), and the loop that hands every message to the part it concerns.
A message counts only if the replica that signed it is the one it speaks for. ``engine run`` is
:meth:`Controller.run`: deploy, submit its requests, wait for them, tear down. Every worker is stopped on
success, error and Ctrl-C; a broker gone longer than ``timeouts.broker_s`` ends the run with BrokerLost.

Ctrl-C and SIGTERM call :meth:`Controller.interrupt`, and the run stops at its next tick, where it stands
between two messages: an exception raised by a signal handler could land anywhere (inside the MQTT client's
socket callback, say), and a task's cancellation can be lost in Python 3.11 (``wait_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from engine.control.broker import (AGENTS_USER, BrokerAddress, BrokerUser, EmbeddedBroker, agents_password_file,
                                  agents_user, embedded_broker, parse_broker)
from engine.control.bus import ControlBus
from engine.control.client import ControlClient
from engine.control.dynsec import RunWorkerUsers
from engine.control.messages import (CpuShare, Heartbeat, Preview, ReplicaRestarting, Shutdown, StageDone, StageFailed,
                                     Status)
from engine.control.signing import read_key, run_key
from engine.control.topics import AgentTopics, Topics
from engine.errors import ControlError, EngineError, Interrupted, NodeError, PlanError
from engine.plan.model import Plan
from engine.plan.placement import ANY, deploy_needs, place_on_agents
from engine.controller.access import RunAccess
from engine.control.agents import agent_offers, live_agents
from engine.worker.contract import spec_maker
from engine.controller.autoscaler import Autoscaler
from engine.controller.placing import NoRoom, ReplicaPlacer
from engine.controller.fleet import Fleet, Launcher, ReplicaInfo, ReplicaKey, RestartPolicy
from engine.plan.cpu_budget import budgeted, cpu_shares
from engine.worker.launcher import LocalLauncher
from engine.controller.progress import ProgressView
from engine.controller.remote import HostLaunchers, RemoteLauncher
from engine.controller.scheduler import Scheduler
from engine.controller.tracker import TrackedRequest
from engine.stages import RequestParams

log = logging.getLogger(__name__)
TICK_S = 0.1
AGENT_WAIT_S = 2.5  #: how long to listen for the agents' announcements (they announce every 2 s)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    run_id: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    save_frames: bool = False
    quiet: bool = False
    heartbeat_s: float = 0.5
    broker_kind: str = "auto"  #: for ``broker: embedded``: auto, mosquitto or amqtt
    restarts: RestartPolicy | None = None  #: start replicas that die again (a service); None: they stay out
    autoscale: bool = True  #: elastic nodes (``replicas: {min, max}``) follow the load; False: they keep ``min``
    #: workers' torch threads are their share of the host's cores (a service); False: torch's own default, which keeps
    #: CPU results bit-identical to a one-process pipeline's (the thread count can change a matmul's last bits)
    cpu_budget: bool = False
    preview_dir: Path | None = None  #: ``engine run --preview DIR``: every preview written there as a JPEG
    stream_video: bool = False  #: the video grows as <stem>.stream.mp4 while it is decoded (a service streams it)


@dataclass
class RunResult:
    run_id: str
    out_dir: Path
    requests: list[TrackedRequest]
    replicas: dict[tuple[str, int], ReplicaInfo]
    started: float
    ready_s: float
    seconds: float
    refused: dict[str, int]  #: messages the controller refused, by reason
    broker_reconnects: int
    plan: Plan  #: the plan as it ran (``place.host: any`` nodes on the agents chosen)


@contextlib.asynccontextmanager
async def broker_for(target: BrokerAddress | EmbeddedBroker, kind: str, access: RunAccess) -> AsyncIterator[BrokerAddress]:
    if isinstance(target, EmbeddedBroker):
        chosen = kind if kind != "auto" else target.kind
        async with embedded_broker(chosen, users=list(access.users.values()), listen=target.listen) as address:  # type: ignore[arg-type]
            yield address
    else:
        yield target


def deployment_key(plan: Plan, broker: BrokerAddress | EmbeddedBroker) -> bytes:
    """The key shared with the agents (ENGINE_DEPLOY_KEY), for a plan with nodes on them; PlanError without one."""
    remote = ", ".join(n.name for n in plan.nodes.values() if n.host != "local")
    if isinstance(broker, EmbeddedBroker) and broker.listen is None:
        raise PlanError(f"node(s) {remote} are placed on agents, which cannot reach an embedded broker on loopback: give "
                        "the graph a broker they can reach (broker: embedded@THIS_HOST_ADDRESS, or mqtt://user:pass@host:1883)")
    text = os.environ.get("ENGINE_DEPLOY_KEY")
    if not text:
        raise PlanError(f"node(s) {remote} are placed on agents: set ENGINE_DEPLOY_KEY to the deployment key the "
                        "agents were started with")
    return read_key(text, "ENGINE_DEPLOY_KEY")


class Controller:
    """One deployment of a plan. ``launcher`` and ``connect`` replace the local processes and the MQTT client
    (tests run the controller against the in-memory bus and a fake launcher)."""

    def __init__(self, plan: Plan, source: Path, options: RunOptions, *, launcher: Launcher | None = None,
                 connect: Callable[[BrokerAddress, str, bytes], ControlBus] | None = None,
                 placer: ReplicaPlacer | None = None):
        self.plan = plan
        self.anywhere = frozenset(n.name for n in plan.nodes.values() if n.host == ANY)  #: placed at deploy
        self.source = source
        self.options = options
        self.topics = Topics(options.run_id)
        self.view = ProgressView(quiet=options.quiet)
        self.broker = parse_broker(plan.broker)
        self.hosts = {n.name: n.host for n in plan.nodes.values() if n.host != "local"}  #: remote node -> agent
        self.deploy_key = deployment_key(plan, self.broker) if self.hosts else None
        self.access = RunAccess.for_run(self.topics, plan, embedded=isinstance(self.broker, EmbeddedBroker),
                                        key=run_key(self.deploy_key, options.run_id) if self.deploy_key else None)
        if isinstance(self.broker, EmbeddedBroker) and self.broker.listen is not None:
            self.access.users[AGENTS_USER] = agents_user(*self.broker.listen)
            deployer = AgentTopics.deployer_client(options.run_id)
            self.access.users[deployer] = BrokerUser.generate(deployer, AgentTopics().deployer_acl(options.run_id))
        self.remote: RemoteLauncher | None = None
        local = launcher or LocalLauncher(options.out_dir / "deploy")
        self.fleet = Fleet(plan, local, self.view, restarts=options.restarts)
        self._connect = connect or self._mqtt
        self.client: ControlBus | None = None
        self.scheduler: Scheduler | None = None
        self.autoscaler: Autoscaler | None = None
        self.placer = placer  #: where scale-outs go; made at deploy when a node is elastic
        self.clock_zero = time.monotonic()
        self.ready_s = 0.0
        self.address: BrokerAddress | None = None  #: the broker, once deployed (the embedded one's port is known then)
        self._interrupted = False

    def _mqtt(self, address: BrokerAddress, client_id: str, key: bytes) -> ControlBus:
        return ControlClient(address, client_id=client_id, key=key, broker_timeout_s=self.plan.timeouts.broker_s)

    async def run(self, requests: list[RequestParams]) -> RunResult:
        """Deploy, run ``requests`` to their end (done or failed), tear down."""
        async with self.deployed() as scheduler:
            handles = [scheduler.submit(params) for params in requests]
            await self.serve_until(lambda: all(handle.finished for handle in handles))
            assert self.client is not None
            return RunResult(self.options.run_id, self.options.out_dir, scheduler.requests, self.fleet.replicas,
                             self.clock_zero, self.ready_s, time.monotonic() - self.clock_zero, refused=self.refused,
                             broker_reconnects=self.client.reconnects, plan=self.plan)

    @contextlib.asynccontextmanager
    async def deployed(self) -> AsyncIterator[Scheduler]:
        """The deployment, up: broker, workers ready, scheduler to submit to. Every worker is stopped on exit.
        Messages are handled only while :meth:`serve_until` runs."""
        self.options.out_dir.mkdir(parents=True, exist_ok=True)
        async with broker_for(self.broker, self.options.broker_kind, self.access) as address:
            self.address = address
            if AGENTS_USER in self.access.users:
                self._show_agent_commands(address)
            me = self.topics.controller_client
            self.client = client = self._connect(self.access.address(address, me), me, self.access.key)
            await client.connect()
            try:
                await self._place_any(address)
                async with self._agents(address):
                    try:
                        await self._deploy(address)
                        self.ready_s = time.monotonic() - self.clock_zero
                        self.view.ready(self.ready_s, self.fleet.replicas)
                        assert self.scheduler is not None
                        yield self.scheduler
                    finally:
                        await self._stop_workers()
            finally:
                await client.close()

    def _show_agent_commands(self, address: BrokerAddress) -> None:
        """The command line of each agent this run places nodes on, complete but for the host's address; the
        password stays in its file."""
        from engine.agent.cli import agent_command

        if os.environ.get("ENGINE_AGENTS_PASSWORD"):
            password_from, password_file = "ENGINE_AGENTS_PASSWORD here", "<a file holding it>"
        else:
            path = agents_password_file(address.host, address.port)
            password_from, password_file = f"in {path} (copy it to each agent's host)", str(path)
        url = dataclasses.replace(address, username=AGENTS_USER).url
        devices: dict[str, list[str]] = {}
        for node in self.plan.nodes.values():
            if node.host != "local" and node.device not in devices.setdefault(node.host, []):
                devices[node.host].append(node.device)
        commands = [agent_command(url, password_file, agent if agent != ANY else "NAME", devices=agent_devices,
                                  models=str(self.source), address=f"<{agent if agent != ANY else 'its'} address>")
                    for agent, agent_devices in sorted(devices.items())]
        self.view.agents_broker(address.display, password_from, commands)

    @property
    def refused(self) -> dict[str, int]:
        """Messages the controller refused, by reason."""
        assert self.client is not None
        return {**self.client.rejected, "impostor": self.scheduler.impostors if self.scheduler else 0}

    async def _place_any(self, address: BrokerAddress) -> None:
        """Nodes with ``place.host: any`` go to the live agent with room for them (engine.plan.placement)."""
        if not any(node.host == ANY for node in self.plan.nodes.values()):
            return
        from engine.families import get_family
        from engine.plan.memory import memory_report

        assert self.deploy_key is not None
        listener = self.access.address(address, AgentTopics.deployer_client(self.options.run_id))
        offers = agent_offers(await live_agents(listener, self.deploy_key, AGENT_WAIT_S), self.plan.timeouts.lease_s)
        report = await asyncio.to_thread(memory_report, self.plan, get_family(self.plan.family), self.source)
        self.plan = place_on_agents(self.plan, deploy_needs(self.plan, report.nodes), offers)
        self.fleet.plan = self.plan
        self.hosts = {n.name: n.host for n in self.plan.nodes.values() if n.host != "local"}
        self.view.placed({n.name: f"{n.host} {n.device}" for n in self.plan.nodes.values() if n.host != "local"})

    @contextlib.asynccontextmanager
    async def _agents(self, address: BrokerAddress) -> AsyncIterator[None]:
        """With nodes on agents: a client under the deployment key, and the remote launcher, for the run's length."""
        if self.deploy_key is None:
            yield
            return
        deployer = AgentTopics.deployer_client(self.options.run_id)
        agents = self._connect(self.access.address(address, deployer), deployer, self.deploy_key)
        await agents.connect()
        # On a standing broker, as its administrator, the run makes broker users for the workers of agents whose
        # users are their own; an embedded broker's agents share one user, which their workers use too.
        users = (RunWorkerUsers(self.access.address(address, deployer), self.topics)
                 if isinstance(self.broker, BrokerAddress) else None)
        self.remote = RemoteLauncher(agents, self.options.run_id, self.hosts, self.plan.timeouts.lease_s, users)
        self.fleet.launcher = HostLaunchers(self.fleet.launcher, self.remote)
        serving = asyncio.create_task(self.remote.serve(), name="agents")
        try:
            yield
        finally:
            serving.cancel()
            results = await asyncio.gather(serving, return_exceptions=True)
            if isinstance(results[0], Exception):
                log.error("following the agents failed: %r", results[0])
            await agents.close()
            if users is not None:
                try:
                    await users.remove_all()
                except ControlError as exc:
                    log.warning("the run's workers' broker users were not all removed: %s", exc)

    async def _deploy(self, address: BrokerAddress) -> None:
        """Start every replica and wait until each has announced itself ready."""
        assert self.client is not None
        for topic in (self.topics.all_status, self.topics.all_heartbeats, self.topics.controller):
            await self.client.subscribe(topic)
        self.scheduler = Scheduler(self.plan, self.topics, self.client, self.fleet, self.view, self.options.out_dir,
                                   preview_dir=self.options.preview_dir)
        self.autoscaler = Autoscaler(self.plan, self.fleet, scaling=self.options.autoscale,
                                     cpu_budget=self.options.cpu_budget)
        make = spec_maker(self.plan, run_id=self.options.run_id, source=self.source,
                          broker=functools.partial(self.access.worker_broker, address), out_dir=self.options.out_dir,
                          save_frames=self.options.save_frames, heartbeat_s=self.options.heartbeat_s,
                          cpu_budget=self.options.cpu_budget, stream_video=self.options.stream_video)
        shares = cpu_shares(budgeted(self.plan, list(self.fleet.replicas)), {})
        if self.placer is None and self.autoscaler.elastic and self.options.autoscale:
            self.placer = await self._replica_placer()
        self.fleet.launch(lambda node, replica, share, device: (make(node, replica, share, device),
                                                                self.access.worker_secrets(address, node, replica)), shares)
        deadline = time.monotonic() + self.plan.timeouts.ready_s
        while not self.fleet.ready():
            if time.monotonic() > deadline:
                raise NodeError(f"not ready after {self.plan.timeouts.ready_s:g} s (timeouts.ready_s): "
                                f"{', '.join(self.fleet.not_ready())}")
            await self._step()
        self.autoscaler.started(shares)

    async def _replica_placer(self) -> ReplicaPlacer:
        """Where scale-outs go: one replica's bytes per node (the memory report), this host's devices and the live
        agents' offers."""
        from engine.families import get_family
        from engine.plan.memory import memory_report

        report = await asyncio.to_thread(memory_report, self.plan, get_family(self.plan.family), self.source)
        return ReplicaPlacer(self.plan, {m.node: m.weight_bytes + m.receive_bytes for m in report.nodes}, self.anywhere,
                             agents=lambda: self.remote.offers() if self.remote is not None else [])

    async def serve_until(self, done: Callable[[], bool]) -> None:
        """Handle messages, dispatch and watch replicas until ``done()``."""
        assert self.scheduler is not None
        while not done():
            self.scheduler.tick()
            await self._step()

    def wake(self) -> None:
        """Tick now rather than after the current wait for a message (up to ``TICK_S``): a request was submitted."""
        if self.client is not None:
            self.client.nudge()

    def interrupt(self) -> None:
        """Stop at the next tick (Ctrl-C, SIGTERM): :class:`Interrupted` is raised there and every worker is stopped.
        A second call does not wait for the tick (a second Ctrl-C)."""
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True

    async def _step(self) -> None:
        """Hand what arrived within one tick to the fleet and the scheduler, then let the fleet check on replicas."""
        assert self.client is not None
        if self._interrupted:
            raise Interrupted
        inbound = await self.client.receive(TICK_S)
        while inbound is not None:
            message = inbound.message
            if inbound.sender != self.topics.signer_of(message):
                assert self.scheduler is not None
                self.scheduler.refuse(inbound.sender, f"{message.kind!r} speaking for another client")
            elif isinstance(message, Status | Heartbeat):
                self.fleet.observe(message)
                if isinstance(message, Heartbeat) and self.scheduler is not None:
                    self.scheduler.on_heartbeat(message)
                if isinstance(message, Heartbeat) and self.autoscaler is not None and (message.node, message.replica) in self.fleet.replicas:
                    self.autoscaler.observe(message)
            elif isinstance(message, StageDone | StageFailed) and self.scheduler is not None:
                self.scheduler.on_answer(message)
            elif isinstance(message, Preview) and self.scheduler is not None:
                self.scheduler.on_preview(message)
            inbound = await self.client.receive(0)
        self.fleet.check(connected=self.client.connected, reconnects=self.client.reconnects)
        for key in self.fleet.due_restarts():
            self._new_process(key)
            self.fleet.restart(key)
        if self.autoscaler is not None:
            self._scale(self.autoscaler)

    def _new_process(self, key: ReplicaKey) -> None:
        """Before a process of a replica starts (again, or at an index an earlier one left), everyone forgets what
        an earlier process of it said, its sequence numbers first (the new process counts from 0): the notices go
        out before the process exists, so they arrive before anything it says."""
        assert self.client is not None
        self.client.forget_sender(self.topics.replica_client(*key))
        notice = ReplicaRestarting(node=key[0], replica=key[1])
        for other, info in self.fleet.replicas.items():
            if other != key and info.down is None:
                self.client.post(self.topics.inbox(*other), notice)

    def _scale(self, autoscaler: Autoscaler) -> None:
        """Carry out the autoscaler's decisions, stop the replicas drained, tell workers whose CPU share moved."""
        assert self.client is not None
        changed = False
        for decision in autoscaler.decisions():
            where = ""
            if decision.direction == "out":
                assert self.placer is not None  # made at deploy for an elastic node that scales
                spot = self.placer.place(decision.node, self.fleet)
                if isinstance(spot, NoRoom):
                    autoscaler.no_room(decision, spot.reason)
                    self.view.not_scaled(decision, spot.reason)
                    continue
                key = (decision.node, self.fleet.free_replica(decision.node))
                if self.remote is not None and spot.host != "local":
                    self.remote.placed[key] = spot.host
                self._new_process(key)
                self.fleet.add(key, autoscaler.share_of_new(key), spot.where)
                where = spot.reason
            else:
                serving = [r for r in self.fleet.replicas.values() if r.node == decision.node and r.down is None
                           and r.state == "ready" and not r.draining]
                key = max(serving, key=lambda r: (-r.assigned, r.replica)).key  # the least busy, the newest first
                self.fleet.drain(key)
            autoscaler.record(decision, key[1], where)
            self.view.scaled(decision, key[1], where)
            changed = True
        for info in self.fleet.retire_drained():
            self.client.post(self.topics.inbox(*info.key), Shutdown(reason="scaled in: its node needs fewer replicas"))
            self.view.retired(info)
        for key, share in autoscaler.moved_shares(force=changed).items():
            if key in self.fleet.replicas:
                self.client.post(self.topics.inbox(*key), CpuShare(share=share))

    async def _stop_workers(self) -> None:
        """Tell every replica to stop, clear their retained status, then make sure every process is gone. The broker
        gets a second per replica at most: the processes are stopped either way."""
        client = self.client
        assert client is not None

        async def farewell(node: str, replica: int) -> None:
            await client.publish(self.topics.inbox(node, replica), Shutdown(reason="run finished"))
            await client.clear_retained(self.topics.status(node, replica))

        for (node, replica) in self.fleet.replicas:
            with contextlib.suppress(EngineError, TimeoutError):
                async with asyncio.timeout(1):
                    await farewell(node, replica)
        await asyncio.to_thread(self.fleet.launcher.stop_all)


async def run_graph(plan: Plan, source: Path, requests: list[RequestParams], options: RunOptions) -> RunResult:
    """``engine run``: SIGINT and SIGTERM interrupt the run, also where SIGINT came in ignored (a script's
    background job): then asyncio would install no Ctrl-C handler of its own."""
    controller = Controller(plan, source, options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, controller.interrupt)
    return await controller.run(requests)
