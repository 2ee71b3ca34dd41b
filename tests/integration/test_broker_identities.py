"""A standing broker (`engine broker`, real mosquitto with its dynamic security plugin) and one broker identity per
agent (`engine agents add`): what each identity may do, checked by connecting with it; a real agent connects with
its own user and `engine hosts` lists it; passwords stay off command lines."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from engine.control.broker import BrokerAddress, free_port
from engine.control.dynsec import RunWorkerUsers
from engine.control.standing import find_dynsec_plugin
from engine.control.topics import Topics
from tests.integration.engine_run import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_dynsec_plugin() is None, reason="mosquitto's dynamic security plugin is not installed"),
]


@dataclass
class Standing:
    host: str
    port: int
    state: Path
    process: subprocess.Popen

    def password_of(self, agent: str) -> str:
        return (self.state / "agents" / f"{agent}.password").read_text().strip()

    @property
    def admin(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port, "engine", (self.state / "admin.password").read_text().strip())


def engine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Standing]:
    state, port = tmp_path_factory.mktemp("broker") / "state", free_port()
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "broker", "--listen", f"127.0.0.1:{port}",
                                "--state-dir", str(state)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # printed once it listens
        assert first.startswith(f"broker (mosquitto) on 127.0.0.1:{port}"), first + process.stdout.read()
        for agent in ("h1", "h2"):
            added = engine("agents", "add", agent, "--state-dir", str(state), "--address", "10.0.0.11")
            assert added.returncode == 0, added.stderr
            assert f"--broker mqtt://agent-{agent}@127.0.0.1:{port} --password-file {agent}.password --name {agent}" \
                in added.stdout and "--address 10.0.0.11" in added.stdout
        yield Standing("127.0.0.1", port, state, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_state_is_private_and_no_password_is_printed(broker):
    assert broker.state.stat().st_mode & 0o777 == 0o700
    for path in [p for p in broker.state.rglob("*") if p.is_file() and p.suffix in (".password", ".json")]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    added = engine("agents", "add", "h3", "--state-dir", str(broker.state))
    assert added.returncode == 0 and broker.password_of("h3") not in added.stdout + added.stderr
    again = engine("agents", "add", "h3", "--state-dir", str(broker.state))
    assert again.returncode == 1 and "agent 'h3' has a broker user already" in again.stderr
    password = broker.password_of("h3")
    assert asyncio.run(attempt(broker, "agent-h3", password, "agent-h3", [])) == []
    assert engine("agents", "remove", "h3", "--state-dir", str(broker.state)).returncode == 0
    assert not (broker.state / "agents" / "h3.password").exists()
    assert isinstance(asyncio.run(attempt(broker, "agent-h3", password, "agent-h3", [])), str)  # refused now


async def attempt(broker: Standing, user: str, password: str, client_id: str, topics: list[str]) -> list[bool] | str:
    """Connect as ``user`` with ``client_id`` and subscribe to each topic: which subscriptions were granted, or why
    the connection was refused."""
    try:
        async with aiomqtt.Client(broker.host, broker.port, username=user, password=password, identifier=client_id,
                                  protocol=aiomqtt.ProtocolVersion.V311) as client:
            granted = []
            for topic in topics:
                (code,) = await client.subscribe(topic, qos=1)
                granted.append((code if isinstance(code, int) else code.value) < 0x80)
            return granted
    except aiomqtt.MqttCodeError as exc:
        return str(exc)


def test_an_agents_credentials_reach_its_own_topics_only_and_take_no_other_client_id(broker):
    password = broker.password_of("h1")
    own = asyncio.run(attempt(broker, "agent-h1", password, "agent-h1",
                              ["dge/agents/h1/orders", "dge/agents/h2/orders", "dge/run-b/#", "dge/+/in/+/+", "#"]))
    assert own == [True, False, False, False, False]
    for other in ("agent-h2", "run-b-controller", "run-b-transformer-0", "hosts-1"):
        refused = asyncio.run(attempt(broker, "agent-h1", password, other, []))
        assert isinstance(refused, str) and "authori" in refused.lower(), other
    assert isinstance(asyncio.run(attempt(broker, "agent-h1", "wrong", "agent-h1", [])), str)


def test_a_runs_worker_users_reach_their_run_only_and_go_with_it(broker):
    async def scenario():
        users = RunWorkerUsers(broker.admin, Topics("run-a"))
        user, password = await users.make("transformer", 0)
        inside = await attempt(broker, user, password, user, ["dge/run-a/in/transformer/0", "dge/run-a/status/+/+",
                                                              "dge/run-b/in/transformer/0", "dge/run-b/#",
                                                              "dge/agents/h1/orders"])
        elsewhere = await attempt(broker, user, password, "run-b-transformer-0", [])
        await users.remove_all()
        after = await attempt(broker, user, password, user, [])
        return user, inside, elsewhere, after

    user, inside, elsewhere, after = asyncio.run(scenario())
    assert user == "run-a-transformer-0" and inside == [True, True, False, False, False]
    assert isinstance(elsewhere, str) and isinstance(after, str)  # pinned to its client id; gone with the run


def test_an_agent_connects_with_its_own_user_and_engine_hosts_lists_it(broker, tmp_path):
    key = secrets.token_hex(32)
    (tmp_path / "h2.password").write_text(broker.password_of("h2"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "agent", "--broker", f"mqtt://agent-h2@127.0.0.1:{broker.port}",
         "--password-file", str(tmp_path / "h2.password"), "--name", "h2", "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env={**os.environ, "ENGINE_DEPLOY_KEY": key}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            listed = engine("hosts", "--broker", f"mqtt://engine@127.0.0.1:{broker.port}", "--wait-s", "2.5",
                            env={"ENGINE_DEPLOY_KEY": key, "ENGINE_BROKER_PASSWORD_FILE": str(broker.state / "admin.password")})
            if listed.returncode == 0 or time.monotonic() > deadline or agent.poll() is not None:
                break
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (row,) = [line.split() for line in listed.stdout.splitlines()[2:]]
        assert row[:2] == ["h2", "online"]
    finally:
        agent.terminate()
        output, _ = agent.communicate(timeout=30)
    assert "refused" not in output and broker.password_of("h2") not in output


def test_a_password_on_the_command_line_is_refused_or_warned_about(broker):
    refused = engine("agent", "--broker", f"mqtt://agent-h1:{broker.password_of('h1')}@127.0.0.1:{broker.port}",
                     "--name", "h1", env={"ENGINE_DEPLOY_KEY": "00" * 32})
    assert refused.returncode == 1 and "a password in the URL shows in `ps`" in refused.stderr
    assert "Traceback" not in refused.stderr
    hosts = engine("hosts", "--broker", f"mqtt://engine:x@127.0.0.1:{broker.port}", env={"ENGINE_DEPLOY_KEY": "00" * 32})
    assert hosts.returncode == 1 and "--password-file" in hosts.stderr
    warned = engine("validate", "graphs/wan_t2v.yaml", "--set", f"broker=mqtt://engine:x@127.0.0.1:{broker.port}")
    assert warned.returncode == 0 and "warning: --set broker=...: the password in the URL shows in `ps`" in warned.stderr
