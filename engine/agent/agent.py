"""``engine agent``: runs the workers of a graph's remote nodes on this host, on orders from a run's controller.

The agent connects to the broker with a last will (its birth topic says ``offline``), announces itself there
(retained: name, version, the address its workers' Mooncake engines listen on, devices with their memory, RDMA
NICs, families, the model folders it may load) and announces again every ``heartbeat_s``. Orders arrive on its
own topic, signed under the deployment key that controllers and agents share; an order counts only if it is
signed by the controller of the run it names. A deploy order is a job, idempotent by id (a repeat is answered
with the job's state: queued, starting, failed with the reason, stopped): each worker spec is validated (the
engine's own WorkerSpec; a model outside ``--models``, a device the host does not offer or another run's id
refuses the whole order) and started as the engine's own worker entry point, never a command taken from a
message. Its workers get the run's key (derived from the deployment key, never sent) and their broker password
on standard input, and die with the agent: the agent's own password, or, when its broker user is its alone
(``engine agents add``), the one of the user the run's controller made for that worker. The agent reports each
worker's exit with its log tail, stops a run's workers on a stop order, when no order renewed the run's lease in
time (its controller is gone), and on SIGTERM; it rides out a broker restart like every client (reconnects,
re-announces), and while it is cut off from the broker itself a lease counts from its reconnect: it cannot hear
the renewals then, so their absence says nothing of the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine import __version__
from engine.control.broker import BrokerAddress
from engine.control.bus import ControlBus, LastWill
from engine.control.messages import AgentBirth, AgentJob, AgentOrder, DeviceInfo
from engine.control.signing import run_key
from engine.control.topics import AgentTopics
from engine.errors import BrokerUnreachable, EngineError
from engine.worker.contract import WorkerSecrets, WorkerSpec
from engine.worker.launcher import LocalLauncher

log = logging.getLogger("engine.agent")
TICK_S = 0.2
ENDED_KEPT_S = 600.0  #: an ended job's record answers repeats of its order this long, then is forgotten
BROKER_WAIT_S = 365 * 86400.0  #: an agent waits for its broker (one that comes up with each run) this long


@dataclass(frozen=True)
class AgentOptions:
    name: str
    broker: BrokerAddress
    deploy_key: bytes = field(repr=False)
    devices: tuple[str, ...]
    models: tuple[Path, ...]
    address: str  #: where this host's Mooncake engines listen and peers reach them
    work_dir: Path  #: worker specs, logs and outputs of each run
    memory: dict[str, int] = field(default_factory=dict)  #: device -> bytes offered (default: what is free)
    heartbeat_s: float = 2.0

    @property
    def own_identity(self) -> bool:
        """Whether its broker user is its alone (named as its client id, as `engine agents add` makes it): then its
        workers cannot connect as it, and each gets a user of its own from the run's controller."""
        return self.broker.username == AgentTopics.agent_client(self.name)


@dataclass
class Job:
    """The workers of one deploy order."""

    order: AgentOrder
    state: str = "queued"
    detail: str | None = None
    launcher: LocalLauncher | None = None
    lease_until: float = 0.0
    reported_exits: set[tuple[str, int]] = field(default_factory=set)
    ended_at: float | None = None  #: monotonic time it stopped or was refused


class Agent:
    def __init__(self, options: AgentOptions, client: ControlBus):
        self.options = options
        self.client = client
        self.topics = AgentTopics()
        self.jobs: dict[tuple[str, str], Job] = {}  # (run id, order id) -> job
        self.stopping = asyncio.Event()

    # -- announcing ---------------------------------------------------------------------------------------------

    def birth(self, state: str = "online") -> AgentBirth:
        return announcement(self.options, state, sorted({j.order.run_id for j in self.jobs.values() if j.state == "starting"}))

    async def serve(self) -> None:
        """Announce, then take orders until stopped; stop every worker on the way out."""
        await self.client.subscribe(self.topics.orders(self.options.name))
        await self.client.publish(self.topics.birth(self.options.name), self.birth(), retain=True)
        announced, reconnects = time.monotonic(), self.client.reconnects
        log.info("agent %s online at %s, devices %s", self.options.name, self.options.address, ", ".join(self.options.devices))
        try:
            while not self.stopping.is_set():
                inbound = await self.client.receive(TICK_S)
                while inbound is not None:
                    if isinstance(inbound.message, AgentOrder):
                        if inbound.sender == self.topics.signer_of(inbound.message):
                            await self.on_order(inbound.message)
                        else:
                            self.client.rejected["impostor"] += 1
                            log.warning("refused an order for run %s signed by %r, not by that run's controller",
                                        inbound.message.run_id, inbound.sender)
                    inbound = await self.client.receive(0)
                await self.check_jobs()
                # Not while the broker is away (between runs of an embedded broker, for hours maybe): a backlog of
                # stale announcements would follow the reconnect. Right after it, a fresh one.
                due = time.monotonic() - announced > self.options.heartbeat_s or self.client.reconnects != reconnects
                if due and self.client.connected:
                    self.client.post(self.topics.birth(self.options.name), self.birth(), retain=True)
                    announced, reconnects = time.monotonic(), self.client.reconnects
        finally:
            for job in self.jobs.values():
                await self.stop(job, "the agent is stopping")
            with contextlib.suppress(EngineError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.client.publish(self.topics.birth(self.options.name), self.birth("offline"), retain=True)

    # -- orders -------------------------------------------------------------------------------------------------

    async def on_order(self, order: AgentOrder) -> None:
        run_jobs = [job for job in self.jobs.values() if job.order.run_id == order.run_id]
        if order.action == "renew":
            for job in run_jobs:
                job.lease_until = time.monotonic() + order.lease_s
            return
        key = (order.run_id, order.order_id)
        if order.action == "stop":  # the job of that order, else every job of the run
            for job in [self.jobs[key]] if key in self.jobs else run_jobs:
                await self.stop(job, "stopped by its controller")
            return
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = Job(order, lease_until=time.monotonic() + order.lease_s)
            try:
                specs = self.accept(order)
            except EngineError as exc:
                job.state, job.detail, job.ended_at = "failed", str(exc), time.monotonic()
                log.warning("refused order %s of run %s: %s", order.order_id, order.run_id, exc)
            else:
                self.start(job, specs)
        self.report(job)

    def accept(self, order: AgentOrder) -> list[tuple[WorkerSpec, str | None]]:
        """The order's worker specs, rewritten for this host, each with its broker password; EngineError saying
        what this agent will not run."""
        specs = []
        for raw in order.workers:
            try:
                spec = WorkerSpec.model_validate(raw)
            except ValidationError as exc:
                raise EngineError(f"an invalid worker spec: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
            if spec.run_id != order.run_id:
                raise EngineError(f"a worker of run {spec.run_id!r} in an order of run {order.run_id!r}")
            source = Path(spec.source).resolve()
            if not any(source.is_relative_to(folder.resolve()) for folder in self.options.models):
                raise EngineError(f"model {spec.source} is outside this agent's model folders "
                                  f"({', '.join(map(str, self.options.models)) or 'none given: --models'})")
            wanted = [device for device in (spec.devices or (spec.device,)) if device not in self.options.devices]
            if wanted:
                raise EngineError(f"node {spec.node!r} wants {', '.join(wanted)}; this agent offers "
                                  f"{', '.join(self.options.devices)}")
            user, password = self.worker_user(spec)
            broker = {"host": self.options.broker.host, "port": self.options.broker.port, "username": user,
                      "password": None, "tls": spec.broker.get("tls")}
            specs.append((spec.model_copy(update={"broker": broker, "out_dir": str(self.run_dir(order.run_id) / "out")}),
                          password))
        return specs

    def worker_user(self, spec: WorkerSpec) -> tuple[str | None, str | None]:
        """The broker user and password a worker connects with: the user its controller made for it when this
        agent's user is its own (that password came in the order, on a topic only this agent may read), else
        this agent's."""
        if not self.options.own_identity:
            return self.options.broker.username, self.options.broker.password
        if not spec.broker.get("password"):
            raise EngineError(f"this agent's broker user {self.options.broker.username!r} is its own: its workers need "
                              "users of their own, which a run's controller makes on `engine broker` as its "
                              "administrator (--set broker=mqtt://engine@...)")
        return spec.broker["username"], spec.broker["password"]

    def run_dir(self, run_id: str) -> Path:
        return self.options.work_dir / run_id

    def start(self, job: Job, specs: list[tuple[WorkerSpec, str | None]]) -> None:
        key = run_key(self.options.deploy_key, job.order.run_id).hex()
        job.launcher = LocalLauncher(self.run_dir(job.order.run_id) / job.order.order_id,
                                     env={"ENGINE_MOONCAKE_HOST": self.options.address})
        for spec, password in specs:
            job.launcher.start(spec, WorkerSecrets(broker_password=password, run_key=key))
        job.state = "starting"
        log.info("run %s: started %s", job.order.run_id, ", ".join(f"{s.node}[{s.replica}]" for s, _ in specs))

    async def stop(self, job: Job, why: str) -> None:
        if job.state != "starting":
            return
        job.state, job.detail, job.ended_at = "stopped", why, time.monotonic()
        if job.launcher is not None:
            await asyncio.to_thread(job.launcher.stop_all)
        log.info("run %s order %s: %s", job.order.run_id, job.order.order_id, why)
        self.report(job)

    def report(self, job: Job) -> None:
        exited = job.launcher.exited() if job.launcher is not None else {}
        self.client.post(self.topics.jobs(job.order.run_id), AgentJob(
            agent=self.options.name, order_id=job.order.order_id, run_id=job.order.run_id, state=job.state,
            detail=job.detail, exited={f"{node}/{replica}": how for (node, replica), how in exited.items()},
            log_tails={f"{node}/{replica}": job.launcher.log_tail((node, replica)) for node, replica in exited}
            if job.launcher is not None else {}))

    async def check_jobs(self) -> None:
        """Report workers that exited; stop the workers of runs whose lease ran out; forget jobs long ended."""
        now = time.monotonic()
        for key in [key for key, job in self.jobs.items() if job.ended_at is not None and now - job.ended_at > ENDED_KEPT_S]:
            del self.jobs[key]
        for job in self.jobs.values():
            if job.state != "starting" or job.launcher is None:
                continue
            if not self.client.connected:  # we cannot hear the controller: its silence says nothing (a broker restart)
                job.lease_until = max(job.lease_until, now + job.order.lease_s)
            if now > job.lease_until:
                await self.stop(job, f"lease of {job.order.lease_s:g} s ran out: the run's controller is gone")
            elif set(job.launcher.exited()) - job.reported_exits:
                job.reported_exits = set(job.launcher.exited())
                self.report(job)


def announcement(options: AgentOptions, state: str, running: list[str]) -> AgentBirth:
    """What the agent says of itself on its birth topic."""
    from engine.families import family_names
    from engine.plan.host import local_capacity, local_free

    return AgentBirth(
        agent=options.name, state=state, version=__version__, address=options.address,
        devices=[DeviceInfo(name=d, total_bytes=local_capacity(d), free_bytes=options.memory.get(d, local_free(d)))
                 for d in options.devices],
        rdma_devices=rdma_devices(), families=family_names(), models=[str(m) for m in options.models], running=running,
        time=time.time(), own_identity=options.own_identity)


def rdma_devices() -> list[str]:
    folder = Path("/sys/class/infiniband")
    return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []


async def run_agent(options: AgentOptions) -> int:
    from engine.control.client import ControlClient

    topics = AgentTopics()
    client_id = topics.agent_client(options.name)
    # Not retained: amqtt delivers a retained will to the next subscriber of any topic. A dead agent's retained
    # birth goes stale instead (its time stops moving), which is how `engine hosts` tells it.
    will = LastWill(topics.birth(options.name), announcement(options, "offline", []))
    client = ControlClient(options.broker, client_id=client_id, key=options.deploy_key, will=will, keepalive_s=10,
                           broker_timeout_s=BROKER_WAIT_S)
    await _connect_when_up(client)
    agent = Agent(options, client)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stopping.set)
    try:
        await agent.serve()
    finally:
        await client.close()
    return 0


async def _connect_when_up(client: ControlBus) -> None:
    """Connect, waiting for a broker that is not up yet (an embedded broker comes up with each run): said once, then
    retried quietly. A broker that refuses the credentials is an error at once."""
    delay = 0.5
    while True:
        try:
            await client.connect()
            return
        except BrokerUnreachable as exc:
            if delay == 0.5:
                log.warning("%s; waiting for it", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
