"""Launching replicas on other hosts: orders to the agents their nodes are placed on, over MQTT.

:class:`RemoteLauncher` is a :class:`~engine.controller.fleet.Launcher` whose workers are started by agents
(:mod:`engine.agent.agent`): one deploy order per replica, signed under the deployment key, holding the
worker's spec and nothing secret (the agent derives the run's key from the deployment key and gives its
workers its broker password). A deploy order goes out once its agent has announced itself: an agent whose broker
user is its own (``engine agents add``) gets, in the order, a broker user made for each of its workers for this run
(:class:`~engine.control.dynsec.RunWorkerUsers`; its orders topic is readable by that agent alone). While the run
lasts it renews the run's lease on each agent every third of the lease, so workers outlive neither their
controller nor a cut link by more than the lease. A deploy order is repeated until its agent answers (an agent
answers a repeat with the job's state). An agent's job report (refused order, a worker that exited, with its log
tail), its going away (its will, believed when no fresh announcement follows within ``OFFLINE_GRACE_S``: a broker
that shuts down publishes every client's will), or no fresh announcement from it within the lease takes its
replicas out of service with that reason. A host that went away is named as such, ahead of its workers' own wills
(believed later, :data:`~engine.control.heartbeat.WILL_GRACE_S`), and the run's end does not wait for its agent.
:class:`HostLaunchers` routes each replica to the local or the remote launcher by its host (its node's, or the agent a
scale-out placed it on).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from engine.control.bus import ControlBus
from engine.control.dynsec import RunWorkerUsers
from engine.control.heartbeat import RECONNECT_ALLOWANCE_S, WILL_GRACE_S
from engine.control.messages import AgentBirth, AgentJob, AgentOrder
from engine.control.topics import AgentTopics
from engine.errors import ControlError
from engine.worker.contract import WorkerSecrets, WorkerSpec
from engine.controller.fleet import Launcher, ReplicaKey
from engine.control.agents import agent_offers
from engine.plan.placement import Offer

log = logging.getLogger(__name__)
STOP_WAIT_S = 5.0  #: how long stop_all waits for the agents to report their workers stopped
RESEND_S = 1.0  #: a deploy order no agent has answered yet is sent again this often (the agent may have been away)
#: An agent's will is believed when no announcement follows it for this long. An agent re-announces itself as soon
#: as it reconnects; shorter than its workers' grace, so that a host gone is named as the host.
OFFLINE_GRACE_S = WILL_GRACE_S - 0.5
QUICK_TICK_S = 0.05  #: how often the loop looks while orders wait to go out or wills wait to be believed


class RemoteLauncher:
    def __init__(self, client: ControlBus, run_id: str, hosts: dict[str, str], lease_s: float,
                 users: RunWorkerUsers | None = None):
        self.client = client
        self.run_id = run_id
        self.hosts = hosts  #: node -> the agent it is placed on
        self.placed: dict[ReplicaKey, str] = {}  #: replicas a scale-out placed on another agent than their node's
        self.lease_s = lease_s
        self.users = users  #: makes the workers' broker users, for agents whose user is their own; None: cannot
        self.topics = AgentTopics()
        self._orders: dict[str, ReplicaKey] = {}  # order id -> the replica it started
        self._current: dict[ReplicaKey, str] = {}  # replica -> the order that started its present process
        self._unsent: dict[str, WorkerSpec] = {}  # deploy orders waiting for their agent's announcement
        self._unanswered: dict[str, AgentOrder] = {}  # deploy orders no report answered yet
        self._births: dict[str, AgentBirth] = {}  # the latest announcement of each of our agents
        self._online: set[str] = set()  # agents that announced themselves online since the run started
        self._gone: set[str] = set()  # agents that went away (their will, believed)
        self._offline_since: dict[str, float] = {}  # agents whose will arrived, since when (monotonic)
        self._reconnects = 0
        self._state: dict[str, str] = {}  # order id -> the job's last reported state
        self._exited: dict[ReplicaKey, str] = {}
        self._tails: dict[ReplicaKey, str] = {}
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def agents(self) -> set[str]:
        return set(self.hosts.values()) | set(self.placed.values())

    def host_of(self, key: ReplicaKey) -> str | None:
        """The agent a replica runs on; None for a replica of this host."""
        return self.placed.get(key) or self.hosts.get(key[0])

    def offers(self) -> list[Offer]:
        """What the live agents offer now (every agent on the broker, not only this run's): where a scale-out of a
        ``place.host: any`` node may go."""
        return agent_offers(list(self._births.values()), self.lease_s)

    async def serve(self) -> None:
        """Follow the agents' reports and renew the run's lease; runs while the run is deployed."""
        self._loop = asyncio.get_running_loop()
        await self.client.subscribe(self.topics.jobs(self.run_id))
        await self.client.subscribe(self.topics.all_births)
        started = renewed = resent = time.monotonic()
        while True:
            quick = self._offline_since or any(self.host_of((spec.node, spec.replica)) in self._births
                                               for spec in self._unsent.values())
            inbound = await self.client.receive(QUICK_TICK_S if quick else min(RESEND_S, self.lease_s / 6))
            if inbound is not None and inbound.sender == self.topics.signer_of(inbound.message):
                self._on_message(inbound.message)
            await self._send_deploys()
            now = time.monotonic()
            if now - renewed > self.lease_s / 3:
                self._order_all("renew")
                renewed = now
            if now - resent > RESEND_S:
                for order in self._unanswered.values():
                    self.client.post(self.topics.orders(self.host_of(self._orders[order.order_id])), order)
                resent = now
            if now - started > self.lease_s:
                self._absent_agents()
            self._gone_agents(now)

    def _absent_agents(self) -> None:
        """Replicas placed on an agent that never said it is online are out, with the reason."""
        for agent in self.agents - self._online:
            for key in [key for key in self._orders.values() if self.host_of(key) == agent]:
                self._exited.setdefault(key, f"agent {agent!r} is not online: no announcement from it within "
                                             f"{self.lease_s:g} s (is `engine agent --name {agent}` running on this broker?)")

    def _gone_agents(self, now: float) -> None:
        """Replicas of agents whose will no announcement followed within the grace are out. While this client is
        itself cut off from the broker the grace restarts: the broker, not the agents, is what is away."""
        if not self.client.connected or self.client.reconnects != self._reconnects:
            self._reconnects = self.client.reconnects
            self._offline_since = dict.fromkeys(self._offline_since, now + RECONNECT_ALLOWANCE_S)
            return
        for agent, since in list(self._offline_since.items()):
            if now - since > OFFLINE_GRACE_S:
                del self._offline_since[agent]
                self._gone.add(agent)
                for key in [key for key in self._orders.values() if self.host_of(key) == agent]:
                    self._exited.setdefault(key, f"host {agent!r} (agent {agent!r}) went away: the agent's broker "
                                                 "connection ended without a goodbye and it did not announce itself "
                                                 f"again within {OFFLINE_GRACE_S:g} s")
                if not self._running():
                    self._stopped.set()

    async def _send_deploys(self) -> None:
        """Send the deploy orders whose agent has announced itself, with broker users for its workers if it needs
        them; a replica whose users cannot be made is out, with the reason."""
        for order_id, spec in list(self._unsent.items()):
            agent = self.host_of((spec.node, spec.replica))
            birth = self._births.get(agent)
            if birth is None:
                continue
            del self._unsent[order_id]
            if birth.own_identity:
                try:
                    spec = await self._with_user(spec, agent)
                except ControlError as exc:
                    self._exited.setdefault((spec.node, spec.replica), str(exc))
                    continue
            self._unanswered[order_id] = self._order(agent, order_id, "deploy", [spec.model_dump(mode="json")])

    async def _with_user(self, spec: WorkerSpec, agent: str) -> WorkerSpec:
        if self.users is None:
            raise ControlError(f"agent {agent!r} has a broker user of its own, so its workers need users of their own, "
                               "which the controller makes only on `engine broker` as its administrator "
                               "(--set broker=mqtt://engine@HOST:PORT)")
        user, password = await self.users.make(spec.node, spec.replica)
        return spec.model_copy(update={"broker": {**spec.broker, "username": user, "password": password}})

    def _on_message(self, message: object) -> None:
        if isinstance(message, AgentJob) and message.order_id in self._orders and message.run_id == self.run_id:
            self._unanswered.pop(message.order_id, None)
            key = self._orders[message.order_id]
            self._state[message.order_id] = message.state
            current = self._current[key] == message.order_id  # not the order of a process a restart replaced
            if message.state == "failed" and current:
                self._exited.setdefault(key, f"refused by agent {message.agent!r}: {message.detail}")
            for name, how in message.exited.items() if current else ():
                node, _, replica = name.rpartition("/")
                self._exited.setdefault((node, int(replica)), f"{how} (on agent {message.agent!r})")
                self._tails[(node, int(replica))] = message.log_tails.get(name, "")
            if not self._running():
                self._stopped.set()
        elif isinstance(message, AgentBirth) and message.state == "online":
            self._births[message.agent] = message
            if time.time() - message.time < self.lease_s:  # a retained birth of a dead agent stops getting younger
                self._online.add(message.agent)
                self._gone.discard(message.agent)
                self._offline_since.pop(message.agent, None)
        elif isinstance(message, AgentBirth) and message.agent in self.agents:  # its will: judged after the grace
            self._offline_since.setdefault(message.agent, time.monotonic())

    def _running(self) -> list[str]:
        """Orders whose workers an agent said it started and has not said it stopped, on agents not gone away."""
        return [order for order, state in self._state.items() if state == "starting"
                and self.host_of(self._orders[order]) not in self._gone | set(self._offline_since)]

    def _order(self, agent: str, order_id: str, action: str, workers: list[dict] | None = None) -> AgentOrder:
        order = AgentOrder(order_id=order_id, run_id=self.run_id, action=action, lease_s=self.lease_s,
                           workers=workers or [])
        self.client.post(self.topics.orders(agent), order)
        return order

    def _order_all(self, action: str) -> None:
        for agent in self.agents:
            self._order(agent, f"{action}-{agent}", action)

    # -- the Launcher ---------------------------------------------------------------------------------------------

    def start(self, spec: WorkerSpec, secrets: WorkerSecrets) -> None:
        """Order the replica's agent to start it; a replica started again gets an order of its own (``-r<n>``)."""
        key = (spec.node, spec.replica)
        restarts = sum(replica == key for replica in self._orders.values())
        order_id = f"{spec.node}-{spec.replica}" + (f"-r{restarts}" if restarts else "")
        self._orders[order_id] = key
        self._current[key] = order_id
        self._exited.pop(key, None)
        self._tails.pop(key, None)
        self._unsent[order_id] = spec

    def exited(self) -> dict[ReplicaKey, str]:
        return dict(self._exited)

    def kill(self, key: ReplicaKey) -> None:
        self._order(self.host_of(key), self._current[key], "stop")

    def stop_all(self) -> None:
        """Order every agent to stop the run's workers and wait (bounded) for them to say so; from any thread."""
        if self._loop is None or not self._running():
            return
        self._stopped.clear()
        self._loop.call_soon_threadsafe(self._order_all, "stop")
        if not self._stopped.wait(STOP_WAIT_S):
            log.warning("not every agent reported the run's workers stopped within %g s; their lease stops them",
                        STOP_WAIT_S)

    def log_tail(self, key: ReplicaKey) -> str:
        tail = self._tails.get(key, "")
        return "last log lines (on its agent):\n    " + tail.replace("\n", "\n    ") if tail else ""


class HostLaunchers:
    """Each replica to the launcher of its node's host: local processes, or the agents."""

    def __init__(self, local: Launcher, remote: RemoteLauncher):
        self.local = local
        self.remote = remote

    def _for(self, key: ReplicaKey) -> Launcher:
        return self.remote if self.remote.host_of(key) is not None else self.local

    def start(self, spec: WorkerSpec, secrets: WorkerSecrets) -> None:
        self._for((spec.node, spec.replica)).start(spec, secrets)

    def exited(self) -> dict[ReplicaKey, str]:
        return {**self.local.exited(), **self.remote.exited()}

    def kill(self, key: ReplicaKey) -> None:
        self._for(key).kill(key)

    def stop_all(self) -> None:
        self.remote.stop_all()
        self.local.stop_all()

    def log_tail(self, key: ReplicaKey) -> str:
        return self._for(key).log_tail(key)
