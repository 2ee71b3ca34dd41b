"""Several hosts on one machine, for the tests and benchmarks of multi-host runs: Linux network namespaces on a
bridge, each a host with its own address running `engine agent`, and a mosquitto with a password on the bridge
address in the root namespace (where the controller runs). Needs root and iproute2; everything made is removed
on the way out, also after a failure, and what an earlier killed run left is removed first.

    root namespace  10.231.0.1   mosquitto, the controller
    dge-<host>      10.231.0.N   `engine agent --name <host>` (N from 2)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
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
    broker: str  #: mqtt://engine:<password>@10.231.0.1:<port>
    key: str  #: the deployment key, hex
    hosts: dict[str, str]  #: host name -> address
    agents: dict[str, subprocess.Popen]
    folder: Path
    mosquitto: NamespaceBroker | None = None  #: the broker made for the cluster, if it made one

    def restart_broker(self, gap_s: float) -> None:
        """Stop the cluster's mosquitto, wait ``gap_s``, start it again on the same port."""
        assert self.mosquitto is not None, "the cluster uses a broker it did not start"
        self.mosquitto.stop()
        time.sleep(gap_s)
        self.mosquitto.start()

    @property
    def env(self) -> dict[str, str]:
        """The environment `engine run` needs here: the deployment key and the controller's Mooncake address."""
        return {**os.environ, "ENGINE_DEPLOY_KEY": self.key, "ENGINE_MOONCAKE_HOST": CONTROLLER}

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
            if b"engine.worker.worker" in cmdline and running:
                alive.append(pid)
        return alive


def remove_hosts(names: list[str]) -> None:
    for host in names:
        subprocess.run(["ip", "netns", "del", f"dge-{host}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@contextlib.contextmanager
def namespace_hosts(folder: Path, names: list[str], models: Path, offers: Mapping[str, str] | None = None,
                    broker: str | None = None) -> Iterator[Cluster]:
    """Hosts ``names`` (10.231.0.2, .3, ...) with an agent each that may load models under ``models``;
    ``offers`` sets an agent's ``--memory cpu=...``; the agents use ``broker`` (a URL) if given, else a mosquitto
    started here on the bridge."""
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
            broker = own.url
        try:
            key = secrets.token_hex(32)
            agents: dict[str, subprocess.Popen] = {}
            try:
                for host, address in hosts.items():
                    memory = ["--memory", f"cpu={offers[host]}"] if offers and host in offers else []
                    with (folder / f"agent-{host}.log").open("w") as log:
                        agents[host] = subprocess.Popen(
                            ["ip", "netns", "exec", f"dge-{host}", sys.executable, "-m", "engine.cli", "agent", "--broker",
                             broker, "--name", host, "--address", address, "--models", str(models), "--work-dir",
                             str(folder / host), *memory],
                            cwd=REPO, env={**os.environ, "ENGINE_DEPLOY_KEY": key}, stdout=log, stderr=subprocess.STDOUT)
                yield Cluster(broker, key, hosts, agents, folder, own)
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
    """mosquitto on the bridge address with one user, ``engine``, and a fresh password; it can be restarted on the
    same port (no persistence: a restart forgets everything, as a crashed broker does)."""

    def __init__(self, folder: Path):
        from engine.control.broker import mosquitto_password_line

        self.folder, self.port, password = folder, free_port(), secrets.token_urlsafe(16)
        self.url = f"mqtt://engine:{password}@{CONTROLLER}:{self.port}"
        (folder / "passwd").write_text(mosquitto_password_line("engine", password))
        (folder / "mosquitto.conf").write_text(
            f"listener {self.port} {CONTROLLER}\nallow_anonymous false\npassword_file {folder / 'passwd'}\n"
            f"persistence false\nset_tcp_nodelay true\nlog_type none\nuser {os.environ.get('USER', 'root')}\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                         str(self.folder / "mosquitto.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex((CONTROLLER, self.port)) == 0:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"mosquitto did not start on {CONTROLLER}:{self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
