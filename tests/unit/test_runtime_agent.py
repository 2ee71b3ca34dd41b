"""The agent's policy, in process on the in-memory bus: which orders it takes, which it refuses and why, leases.
No worker process is started: refused orders never reach the launcher, and accepted ones start a fake one."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from engine.control.broker import BrokerAddress
from engine.control.memory import MemoryBroker
from engine.control.messages import AgentJob, AgentOrder
from engine.control.signing import Sealer, new_key
from engine.control.topics import AgentTopics
from engine.agent import agent as agent_module
from engine.agent.agent import Agent, AgentOptions
from engine.worker.contract import WorkerSpec, worker_specs
from tests.unit.test_runtime_scheduler import plan_of

TOPICS = AgentTopics()


class FakeLauncher:
    started: list[tuple[str, int]] = []

    def __init__(self, deploy_dir: Path, env: dict[str, str] | None = None):
        self.env = env or {}
        self.stopped = False

    def start(self, spec, secrets) -> None:
        FakeLauncher.started.append((spec.node, spec.replica))
        self.spec, self.secrets = spec, secrets

    def exited(self) -> dict:
        return {}

    def stop_all(self) -> None:
        self.stopped = True

    def log_tail(self, key) -> str:
        return ""


@pytest.fixture(autouse=True)
def fake_launcher(monkeypatch):
    FakeLauncher.started = []
    monkeypatch.setattr(agent_module, "LocalLauncher", FakeLauncher)


def spec_json(run_id: str, models: Path, **update) -> dict:
    (spec,) = [s for s in worker_specs(plan_of("wan_t2v.yaml"), run_id=run_id, source=models / "wan-tiny",
                                       broker=lambda node, replica: {"host": "10.0.0.1", "port": 1883}, out_dir=Path("/o"),
                                       save_frames=False, heartbeat_s=1.0) if s.node == "transformer"]
    return {**spec.model_dump(mode="json"), **update}


def order(run_id: str, workers: list[dict], action: str = "deploy", order_id: str = "transformer-0",
          lease_s: float = 10.0) -> AgentOrder:
    return AgentOrder(order_id=order_id, run_id=run_id, action=action, lease_s=lease_s, workers=workers)


def scenario(tmp_path: Path, orders: list[tuple[str, AgentOrder]], after: float = 0.3, user: str = "agent"):
    """An agent on the memory bus gets ``orders`` (each signed by the named client); returns its job reports."""
    broker = MemoryBroker()
    options = AgentOptions(name="h1", broker=BrokerAddress("10.0.0.1", 1883, user, "pw"), deploy_key=broker.key,
                           devices=("cpu",), models=(tmp_path / "models",), address="10.0.0.2", work_dir=tmp_path / "work")

    async def run():
        agent = Agent(options, broker.connect(TOPICS.agent_client("h1")))
        controller = broker.connect("observer")
        await controller.subscribe(f"{TOPICS.prefix}/+/jobs")
        serving = asyncio.create_task(agent.serve())
        await asyncio.sleep(0.05)
        sealers: dict[str, Sealer] = {}
        for signer, message in orders:
            topic = TOPICS.orders("h1")
            broker.inject(topic, sealers.setdefault(signer, Sealer(broker.key, signer)).seal(topic, message))
        await asyncio.sleep(after)
        agent.stopping.set()
        await serving
        reports = []
        while (inbound := await controller.receive(0)) is not None:
            reports.append(inbound.message)
        return reports, agent

    (tmp_path / "models" / "wan-tiny").mkdir(parents=True)
    return asyncio.run(run())


def test_a_deploy_order_starts_the_engine_worker_with_the_derived_run_key_and_the_agents_broker(tmp_path):
    from engine.control.signing import run_key

    reports, agent = scenario(tmp_path, [("run1-deployer", order("run1", [spec_json("run1", tmp_path / "models")]))])
    assert FakeLauncher.started == [("transformer", 0)]
    job = agent.jobs[("run1", "transformer-0")]
    launched = job.launcher
    assert launched.secrets.key == run_key(agent.options.deploy_key, "run1") and launched.secrets.broker_password == "pw"
    assert launched.spec.broker["host"] == "10.0.0.1" and launched.spec.broker["password"] is None
    assert launched.env == {"ENGINE_MOONCAKE_HOST": "10.0.0.2"}
    assert str(tmp_path / "work" / "run1") in launched.spec.out_dir
    assert [r.state for r in reports if isinstance(r, AgentJob)][:1] == ["starting"]
    assert launched.stopped  # the agent stopping stops its workers


def test_an_agent_with_its_own_broker_user_gives_each_worker_the_user_made_for_it(tmp_path):
    models = tmp_path / "models"
    worker = spec_json("run1", models, broker={"host": "10.0.0.1", "port": 1883, "username": "run1-transformer-0",
                                               "password": "made-for-it"})
    reports, agent = scenario(tmp_path, [("run1-deployer", order("run1", [worker])),
                                         ("run1-deployer", order("run1", [spec_json("run1", models)], order_id="bare"))],
                              user="agent-h1")
    assert agent.options.own_identity and agent.birth().own_identity
    launched = agent.jobs[("run1", "transformer-0")].launcher
    assert launched.secrets.broker_password == "made-for-it"  # on standard input, never in the spec file
    assert launched.spec.broker["username"] == "run1-transformer-0" and launched.spec.broker["password"] is None
    bare = next(r for r in reports if r.order_id == "bare")  # no user made for the worker: it cannot connect as h1
    assert bare.state == "failed" and "its workers need users of their own" in bare.detail
    assert FakeLauncher.started == [("transformer", 0)]


def test_a_repeated_order_is_answered_without_starting_again(tmp_path):
    deploy = order("run1", [spec_json("run1", tmp_path / "models")])
    reports, _ = scenario(tmp_path, [("run1-deployer", deploy), ("run1-deployer", deploy)])
    assert FakeLauncher.started == [("transformer", 0)]
    assert [r.state for r in reports][:2] == ["starting", "starting"]


@pytest.mark.parametrize(("signer", "make", "refusal"), [
    ("run2-deployer", lambda models: order("run1", [spec_json("run1", models)]), None),  # another run's controller
    ("run1-deployer", lambda models: order("run1", [spec_json("run2", models)]), "a worker of run 'run2'"),
    ("run1-deployer", lambda models: order("run1", [spec_json("run1", models, source="/etc")]), "outside this agent's model folders"),
    ("run1-deployer", lambda models: order("run1", [spec_json("run1", models, device="cuda:0")]), "this agent offers cpu"),
    ("run1-deployer", lambda models: order("run1", [{**spec_json("run1", models), "command": "rm -rf /"}]), "invalid worker spec"),
])
def test_forged_or_unfit_orders_start_nothing(tmp_path, signer, make, refusal):
    reports, agent = scenario(tmp_path, [(signer, make(tmp_path / "models"))])
    assert FakeLauncher.started == []
    if refusal is None:  # not even answered: the signer is not the run's controller
        assert reports == [] and agent.client.rejected["impostor"] == 1
    else:
        (report,) = reports
        assert report.state == "failed" and refusal in report.detail


def test_an_order_signed_with_another_key_is_dropped(tmp_path):
    forged = order("run1", [spec_json("run1", tmp_path / "models")])
    broker = MemoryBroker()

    async def run():
        agent = Agent(AgentOptions(name="h1", broker=BrokerAddress("10.0.0.1", 1883), deploy_key=broker.key, devices=("cpu",),
                                   models=(tmp_path,), address="10.0.0.2", work_dir=tmp_path), broker.connect("agent-h1"))
        serving = asyncio.create_task(agent.serve())
        await asyncio.sleep(0.05)
        topic = TOPICS.orders("h1")
        broker.inject(topic, Sealer(new_key(), "run1-deployer").seal(topic, forged))
        broker.inject(topic, json.dumps(forged.model_dump()).encode())
        await asyncio.sleep(0.2)
        agent.stopping.set()
        await serving
        return agent

    agent = asyncio.run(run())
    assert FakeLauncher.started == [] and dict(agent.client.rejected) == {"bad signature": 1, "unsigned": 1}


def test_workers_are_stopped_when_the_lease_runs_out(tmp_path):
    reports, agent = scenario(tmp_path, [("run1-deployer", order("run1", [spec_json("run1", tmp_path / "models")],
                                                                  lease_s=0.2))], after=0.8)
    assert agent.jobs[("run1", "transformer-0")].launcher.stopped
    stopped = [r for r in reports if r.state == "stopped"]
    assert stopped and "lease of 0.2 s ran out" in stopped[0].detail


def test_each_run_gets_its_own_job_for_the_same_order_id(tmp_path):
    models = tmp_path / "models"
    reports, agent = scenario(tmp_path, [("run1-deployer", order("run1", [spec_json("run1", models)])),
                                         ("run1-deployer", order("run1", [], action="stop")),
                                         ("run2-deployer", order("run2", [spec_json("run2", models)]))])
    assert FakeLauncher.started == [("transformer", 0), ("transformer", 0)]
    assert [(r.run_id, r.state) for r in reports][:3] == [("run1", "starting"), ("run1", "stopped"), ("run2", "starting")]


def test_ended_jobs_are_forgotten_after_a_while(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "ENDED_KEPT_S", 0.2)
    models = tmp_path / "models"
    _, agent = scenario(tmp_path, [("run1-deployer", order("run1", [spec_json("run1", models)])),
                                   ("run1-deployer", order("run1", [], action="stop"))], after=0.6)
    assert agent.jobs == {}  # the run ended: its record went after ENDED_KEPT_S


async def next_deploy(agent, within_s: float) -> AgentOrder | None:
    """The next deploy order ``agent`` gets within ``within_s`` (renewals skipped)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within_s):
            while True:
                inbound = await agent.receive(within_s)
                if inbound is not None and inbound.message.action == "deploy":
                    return inbound.message
    return None


def test_the_controller_side_repeats_orders_until_answered_and_names_an_absent_agent(tmp_path):
    from engine.controller.remote import RemoteLauncher

    broker = MemoryBroker()

    async def run():
        launcher = RemoteLauncher(broker.connect("run1-deployer"), "run1", {"transformer": "h1", "encoder": "h2"},
                                  lease_s=0.6)
        serving = asyncio.create_task(launcher.serve())
        await asyncio.sleep(0.05)
        h1 = broker.connect("agent-h1")
        await h1.subscribe(TOPICS.orders("h1"))
        launcher.start(WorkerSpec.model_validate(spec_json("run1", tmp_path)), None)  # type: ignore[arg-type]
        assert await next_deploy(h1, 0.3) is None  # not sent before the agent announced itself
        await h1.publish(TOPICS.birth("h1"), agent_module.announcement(AgentOptions(
            name="h1", broker=BrokerAddress("x", 1), deploy_key=broker.key, devices=("cpu",), models=(), address="a",
            work_dir=tmp_path), "online", []), retain=True)
        first = await next_deploy(h1, 1)
        await h1.publish(TOPICS.jobs("run1"), AgentJob(agent="h1", order_id="transformer-0", run_id="run1", state="failed",
                                                       detail="model outside --models", exited={}, log_tails={}))
        launcher.start(WorkerSpec.model_validate({**spec_json("run1", tmp_path), "node": "encoder"}), None)  # type: ignore[arg-type]
        await asyncio.sleep(1.0)
        serving.cancel()
        return first, launcher.exited()

    first, exited = asyncio.run(run())
    assert isinstance(first, AgentOrder) and first.order_id == "transformer-0"
    assert exited[("transformer", 0)] == "refused by agent 'h1': model outside --models"
    assert exited[("encoder", 0)].startswith("agent 'h2' is not online: no announcement from it within 0.6 s")


def test_an_agents_will_counts_only_when_no_announcement_follows_it(tmp_path, monkeypatch):
    from engine.controller import remote

    monkeypatch.setattr(remote, "OFFLINE_GRACE_S", 0.3)
    broker = MemoryBroker()

    def birth(state: str):
        return agent_module.announcement(AgentOptions(
            name="h1", broker=BrokerAddress("x", 1), deploy_key=broker.key, devices=("cpu",), models=(), address="a",
            work_dir=tmp_path), state, [])

    async def run():
        launcher = remote.RemoteLauncher(broker.connect("run1-deployer"), "run1", {"transformer": "h1"}, lease_s=60)
        serving = asyncio.create_task(launcher.serve())
        await asyncio.sleep(0.05)
        launcher.start(WorkerSpec.model_validate(spec_json("run1", tmp_path)), None)  # type: ignore[arg-type]
        h1 = broker.connect("agent-h1")
        await h1.publish(TOPICS.birth("h1"), birth("online"))
        await h1.publish(TOPICS.birth("h1"), birth("offline"))  # a broker going down publishes the agent's will
        await asyncio.sleep(0.1)
        await h1.publish(TOPICS.birth("h1"), birth("online"))  # and the agent is back with it
        await asyncio.sleep(1.2)
        survived = launcher.exited()
        await h1.publish(TOPICS.birth("h1"), birth("offline"))  # gone for good
        await asyncio.sleep(1.2)
        serving.cancel()
        return survived, launcher.exited()

    survived, gone = asyncio.run(run())
    assert survived == {}
    assert gone == {("transformer", 0): "host 'h1' (agent 'h1') went away: the agent's broker connection ended without "
                                        "a goodbye and it did not announce itself again within 0.3 s"}


class FakeUsers:
    def __init__(self):
        self.made: list[tuple[str, int]] = []

    async def make(self, node: str, replica: int) -> tuple[str, str]:
        self.made.append((node, replica))
        return f"run1-{node}-{replica}", f"secret-{node}"


@pytest.mark.parametrize("users", [FakeUsers(), None])
def test_workers_of_an_agent_with_its_own_user_get_users_made_for_the_run(tmp_path, users):
    from engine.controller.remote import RemoteLauncher

    broker = MemoryBroker()

    async def run():
        launcher = RemoteLauncher(broker.connect("run1-deployer"), "run1", {"transformer": "h1"}, lease_s=60, users=users)
        serving = asyncio.create_task(launcher.serve())
        h1 = broker.connect("agent-h1")
        await h1.subscribe(TOPICS.orders("h1"))
        await h1.publish(TOPICS.birth("h1"), agent_module.announcement(AgentOptions(
            name="h1", broker=BrokerAddress("x", 1, "agent-h1"), deploy_key=broker.key, devices=("cpu",), models=(),
            address="a", work_dir=tmp_path), "online", []), retain=True)
        launcher.start(WorkerSpec.model_validate(spec_json("run1", tmp_path)), None)  # type: ignore[arg-type]
        deploy = await next_deploy(h1, 0.5)
        serving.cancel()
        return deploy, launcher.exited()

    deploy, exited = asyncio.run(run())
    if users is not None:
        assert users.made == [("transformer", 0)] and exited == {}
        broker_of = deploy.workers[0]["broker"]
        assert (broker_of["username"], broker_of["password"]) == ("run1-transformer-0", "secret-transformer")
    else:
        assert deploy is None and "agent 'h1' has a broker user of its own" in exited[("transformer", 0)]


def test_a_lease_counts_from_the_reconnect_while_the_agent_is_cut_off_from_the_broker(tmp_path, monkeypatch):
    """A broker restart longer than the lease: the renewals could not come, so the workers stay."""
    from engine.control.memory import MemoryBus

    broker, link = MemoryBroker(), {"up": True}
    monkeypatch.setattr(MemoryBus, "connected", property(lambda self: link["up"]))

    async def run():
        agent = Agent(AgentOptions(name="h1", broker=BrokerAddress("10.0.0.1", 1883), deploy_key=broker.key,
                                   devices=("cpu",), models=(tmp_path / "models",), address="10.0.0.2",
                                   work_dir=tmp_path / "work"), broker.connect("agent-h1"))
        serving = asyncio.create_task(agent.serve())
        await asyncio.sleep(0.05)
        topic = TOPICS.orders("h1")
        broker.inject(topic, Sealer(broker.key, "run1-deployer").seal(
            topic, order("run1", [spec_json("run1", tmp_path / "models")], lease_s=0.3)))
        await asyncio.sleep(0.1)
        link["up"] = False  # the broker is away for longer than the lease
        await asyncio.sleep(0.8)
        kept = agent.jobs[("run1", "transformer-0")].state
        link["up"] = True  # back, and no renewal comes: the controller is gone
        await asyncio.sleep(0.6)
        agent.stopping.set()
        await serving
        return kept, agent.jobs[("run1", "transformer-0")]

    (tmp_path / "models" / "wan-tiny").mkdir(parents=True)
    kept, job = asyncio.run(run())
    assert kept == "starting"
    assert job.state == "stopped" and "lease of 0.3 s ran out" in job.detail


def test_a_replica_a_scale_out_placed_on_another_agent_is_ordered_there(tmp_path):
    """The run's transformer is on h1; its replica 1 was placed on h2 (a `place.host: any` scale-out): its deploy and
    stop orders go to h2, and every live agent's offer is seen, not only the run's agents'."""
    from engine.controller.remote import RemoteLauncher

    broker = MemoryBroker()

    async def run():
        launcher = RemoteLauncher(broker.connect("run1-deployer"), "run1", {"transformer": "h1"}, lease_s=60)
        serving = asyncio.create_task(launcher.serve())
        await asyncio.sleep(0.05)
        agents = {}
        for name in ("h1", "h2"):
            agents[name] = broker.connect(f"agent-{name}")
            await agents[name].subscribe(TOPICS.orders(name))
            await agents[name].publish(TOPICS.birth(name), agent_module.announcement(AgentOptions(
                name=name, broker=BrokerAddress("x", 1), deploy_key=broker.key, devices=("cpu",), models=(), address="a",
                work_dir=tmp_path, memory={"cpu": 2**30}), "online", []), retain=True)
        await asyncio.sleep(0.1)
        offers = launcher.offers()
        launcher.placed[("transformer", 1)] = "h2"
        launcher.start(WorkerSpec.model_validate(spec_json("run1", tmp_path, replica=1)), None)  # type: ignore[arg-type]
        deploy = await next_deploy(agents["h2"], 1)
        launcher.kill(("transformer", 1))
        stop = None
        async with asyncio.timeout(1):
            while stop is None:
                inbound = await agents["h2"].receive(1)
                stop = inbound.message if inbound is not None and inbound.message.action == "stop" else None
        serving.cancel()
        return offers, deploy, stop, launcher.agents

    offers, deploy, stop, agents = asyncio.run(run())
    assert sorted((o.agent, o.device, o.free_bytes) for o in offers) == [("h1", "cpu", 2**30), ("h2", "cpu", 2**30)]
    assert deploy.order_id == "transformer-1" and deploy.workers[0]["replica"] == 1
    assert stop.order_id == "transformer-1" and agents == {"h1", "h2"}
