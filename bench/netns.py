"""Several hosts on one machine, for the tests and benchmarks of multi-host runs: Linux network namespaces on a
bridge, each a host with its own address running `engine agent`, and a standing broker (`engine broker`: mosquitto
with per-agent identities) on the bridge address in the root namespace, where the controller runs as the broker's
user `engine`. Each agent has a broker user of its own (`engine agents add`), its password in a file. Needs root
and iproute2; everything made is removed on the way out, also after a failure, and what an earlier killed run left
is removed first.

    root namespace  10.231.0.1   `engine broker`, the controller
    dge-<host>      10.231.0.N   `engine agent --name <host>` (N from 2)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BRIDGE, SUBNET = "br-dge", "10.231.0"
CONTROLLER = f"{SUBNET}.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    broker: str  #: mqtt://engine@10.231.0.1:<port> (its password: env's ENGINE_BROKER_PASSWORD_FILE)
    key: str  #: the deployment key, hex
    hosts: dict[str, str]  #: host name -> address
    agents: dict[str, subprocess.Popen]
    folder: Path
    standing: NamespaceBroker | None = None  #: the broker made for the cluster, if it made one

    def restart_broker(self, gap_s: float) -> None:
        """Stop the cluster's broker, wait ``gap_s``, start it again on the same port (its users kept)."""
        assert self.standing is not None, "the cluster uses a broker it did not start"
        self.standing.stop()
        time.sleep(gap_s)
        self.standing.start()

    @property
    def env(self) -> dict[str, str]:
        """The environment `engine run` needs here: the deployment key, the broker password's file and the
        controller's Mooncake address."""
        admin = {"ENGINE_BROKER_PASSWORD_FILE": str(self.standing.state / "admin.password")} if self.standing else {}
        return {**os.environ, "ENGINE_DEPLOY_KEY": self.key, "ENGINE_MOONCAKE_HOST": CONTROLLER, **admin}

    def agent_log(self, host: str) -> str:
        return (self.folder / f"agent-{host}.log").read_text()

    def namespace_pids(self, host: str) -> set[int]:
        found = subprocess.run(["ip", "netns", "pids", f"dge-{host}"], capture_output=True, text=True).stdout.split()
        return {int(pid) for pid in found} - {self.agents[host].pid}

    def workers_in(self, host: str) -> list[int]:
        alive = []
        for pid in self.namespace_pids(host):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                running = Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            except OSError:
                continue
            if (b"engine.worker.worker" in cmdline or b"engine.worker.rank" in cmdline) and running:
                alive.append(pid)
        return alive


def remove_hosts(names: list[str]) -> None:
    for host in names:
        subprocess.run(["ip", "netns", "del", f"dge-{host}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@contextlib.contextmanager
def namespace_hosts(folder: Path, names: list[str], models: Path, offers: Mapping[str, str] | None = None,
                    broker: tuple[str, Path] | None = None) -> Iterator[Cluster]:
    """Hosts ``names`` (10.231.0.2, .3, ...) with an agent each that may load models under ``models``;
    ``offers`` sets an agent's ``--memory cpu=...``; the agents use ``broker`` (a URL without password, and the
    file holding it) if given, else `engine broker` started here on the bridge, each as its own user."""
    hosts = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(names)}
    remove_hosts(names)
    try:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{CONTROLLER}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for host, address in hosts.items():
            ip("netns", "add", f"dge-{host}")
            ip("link", "add", f"veth-{host}", "type", "veth", "peer", "name", "eth0", "netns", f"dge-{host}")
            ip("link", "set", f"veth-{host}", "master", BRIDGE, "up")
            ip("-n", f"dge-{host}", "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", f"dge-{host}", "link", "set", "eth0", "up")
            ip("-n", f"dge-{host}", "link", "set", "lo", "up")
        own = None if broker else NamespaceBroker(folder)
        if own is not None:
            own.start()
        try:
            key = secrets.token_hex(32)
            agents: dict[str, subprocess.Popen] = {}
            try:
                for host, address in hosts.items():
                    url, password_file = broker or own.add_agent(host)  # type: ignore[union-attr]
                    memory = ["--memory", f"cpu={offers[host]}"] if offers and host in offers else []
                    with (folder / f"agent-{host}.log").open("w") as log:
                        agents[host] = subprocess.Popen(
                            ["ip", "netns", "exec", f"dge-{host}", sys.executable, "-m", "engine.cli", "agent", "--broker",
                             url, "--password-file", str(password_file), "--name", host, "--address", address, "--models",
                             str(models), "--work-dir", str(folder / host), *memory],
                            cwd=REPO, env={**os.environ, "ENGINE_DEPLOY_KEY": key}, stdout=log, stderr=subprocess.STDOUT)
                yield Cluster(own.url if own else broker[0], key, hosts, agents, folder, own)  # type: ignore[index]
            finally:
                for agent in agents.values():
                    agent.terminate()
                    agent.wait(timeout=15)
        finally:
            if own is not None:
                own.stop()
    finally:
        remove_hosts(names)


class NamespaceBroker:
    """`engine broker` on the bridge address, its state in the cluster's folder; it can be restarted on the same port
    (its users kept, its retained messages forgotten, as a crashed broker's are)."""

    def __init__(self, folder: Path):
        self.state, self.port = folder / "broker", free_port()
        self.url = f"mqtt://engine@{CONTROLLER}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with (self.state.parent / "broker.log").open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "broker", "--listen", f"{CONTROLLER}:{self.port}", "--state-dir",
                 str(self.state), "--kind", "mosquitto"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex((CONTROLLER, self.port)) == 0:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"engine broker did not start on {CONTROLLER}:{self.port}: "
                                   f"{(self.state.parent / 'broker.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def add_agent(self, host: str) -> tuple[str, Path]:
        """`engine agents add HOST`: the agent's broker URL and its password's file."""
        subprocess.run([sys.executable, "-m", "engine.cli", "agents", "add", host, "--state-dir", str(self.state)],
                       cwd=REPO, check=True, capture_output=True, timeout=60)
        return f"mqtt://agent-{host}@{CONTROLLER}:{self.port}", self.state / "agents" / f"{host}.password"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
