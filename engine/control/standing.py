"""``engine broker``: a broker that outlives runs and services, its state kept in a folder.

The state folder (default ``~/.local/state/engine/broker``; mode 0700, every file in it 0600):

    admin.password          the password of ``engine``, the user runs, services and ``engine hosts`` connect as
    dynamic-security.json   mosquitto's users and roles: ``engine``, each agent's, each running run's workers'
    broker.json             where the broker listens and which broker it is, for ``engine agents`` on this host
    agents/<name>.password  each agent's password (``engine agents add``), to copy to the agent's host
    mosquitto.conf, mosquitto.log

mosquitto runs with its dynamic security plugin, so that each agent has an identity of its own (:mod:`engine.control
.dynsec`). Without mosquitto, amqtt runs in this process with the one user ``engine`` and no ACLs: agents then
connect as ``engine`` too, and only the signatures keep them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from engine.control.broker import (PASSWORD_FILE_ENV, BrokerAddress, BrokerUser, find_mosquitto, start_mosquitto,
                                   state_folder, stop_process, wait_listening, write_secret)
from engine.control.dynsec import Identities, identity_commands, initial_config, removal_commands
from engine.control.topics import AgentTopics
from engine.errors import ControlError

ADMIN_USER = "engine"
_DYNSEC_PLACES = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                  "/usr/local/lib/mosquitto_dynamic_security.so", "/opt/homebrew/lib/mosquitto_dynamic_security.so")


def find_dynsec_plugin() -> Path | None:
    """mosquitto's dynamic security plugin, where distributions install it."""
    return next((Path(found) for place in _DYNSEC_PLACES for found in sorted(glob.glob(place))), None)


@dataclass(frozen=True)
class BrokerState:
    """The state folder of a standing broker."""

    folder: Path

    @classmethod
    def at(cls, folder: Path | None) -> BrokerState:
        return cls(folder or state_folder() / "broker")

    @property
    def admin_password_file(self) -> Path:
        return self.folder / "admin.password"

    @property
    def dynsec_file(self) -> Path:
        return self.folder / "dynamic-security.json"

    def agent_password_file(self, agent: str) -> Path:
        return self.folder / "agents" / f"{agent}.password"

    def prepare(self, host: str, port: int, kind: str) -> None:
        """Make the folder and the administrator on first use; record where the broker listens."""
        (self.folder / "agents").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        if not self.admin_password_file.exists():
            write_secret(self.admin_password_file, secrets.token_urlsafe(24) + "\n")
        if kind == "mosquitto" and not self.dynsec_file.exists():
            config = initial_config(ADMIN_USER, self.admin_password(), AgentTopics().prefix)
            write_secret(self.dynsec_file, json.dumps(config, indent=1))
        write_secret(self.folder / "broker.json", json.dumps({"host": host, "port": port, "kind": kind}), replace=True)

    def admin_password(self) -> str:
        return self.admin_password_file.read_text().strip()

    def admin(self) -> tuple[BrokerAddress, str]:
        """The running broker's address as its administrator, and which broker it is (mosquitto or amqtt)."""
        try:
            where = json.loads((self.folder / "broker.json").read_text())
            password = self.admin_password()
        except (OSError, ValueError) as exc:
            raise ControlError(f"no standing broker's state in {self.folder} ({exc}): start `engine broker` first, "
                               "or give its --state-dir") from None
        return BrokerAddress(where["host"], where["port"], ADMIN_USER, password), where["kind"]


async def serve_broker(state: BrokerState, host: str, port: int, kind: str = "auto") -> None:
    """Run the standing broker until SIGINT or SIGTERM."""
    binary = find_mosquitto() if kind != "amqtt" else None
    plugin = find_dynsec_plugin() if binary is not None else None
    if kind == "mosquitto" and (binary is None or plugin is None):
        raise ControlError("mosquitto with its dynamic security plugin (mosquitto_dynamic_security.so) is not "
                           "installed; install mosquitto, or use --kind amqtt (one user, no per-agent identities)")
    chosen = "mosquitto" if binary is not None and plugin is not None else "amqtt"
    state.prepare(host, port, chosen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    if chosen == "amqtt":
        from engine.control.amqtt_broker import run_amqtt

        async with run_amqtt([BrokerUser(ADMIN_USER, state.admin_password())], (host, port)):
            await _announce(state, host, port, chosen)
            await stopping.wait()
        return
    assert binary is not None and plugin is not None
    config = state.folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} {host}\nuser {pwd.getpwuid(os.getuid()).pw_name}\nallow_anonymous false\n"
        f"plugin {plugin}\nplugin_opt_config_file {state.dynsec_file}\npersistence false\n"
        "max_inflight_messages 0\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n")
    log = state.folder / "mosquitto.log"
    process = start_mosquitto(binary, config, log)
    try:
        if not await wait_listening(process, host, port, 10.0, log):
            raise ControlError(f"mosquitto cannot listen on {host}:{port}: {log.read_text()[-300:].strip()}")
        await _announce(state, host, port, chosen)
        while not stopping.is_set() and process.poll() is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stopping.wait()
        if process.poll() is not None:
            raise ControlError(f"mosquitto exited with code {process.returncode}: {log.read_text()[-500:].strip()}")
    finally:
        stop_process(process)


async def _announce(state: BrokerState, host: str, port: int, kind: str) -> None:
    print(f"broker ({kind}) on {host}:{port}, state in {state.folder}\n"
          f"runs and services:  {PASSWORD_FILE_ENV}={state.admin_password_file} engine run GRAPH --set "
          f"broker=mqtt://{ADMIN_USER}@{host}:{port} ...\n"
          + ("each agent:         engine agents add NAME  (its own broker user, confined to its topics)"
             if kind == "mosquitto" else
             f"agents:             engine agent --broker mqtt://{ADMIN_USER}@{host}:{port} --password-file "
             f"{state.admin_password_file} ...  (amqtt: one user for all, no ACLs)"), flush=True)



async def add_agent(state: BrokerState, agent: str) -> tuple[BrokerAddress, Path]:
    """Give ``agent`` a broker user of its own, confined to its topics; its password goes to a file here. Returns
    the broker's address as that user (without the password) and the file."""
    admin, kind = state.admin()
    if kind != "mosquitto":
        raise ControlError(f"this standing broker is {kind}, without per-agent identities: agents connect as "
                           f"{ADMIN_USER!r} (--password-file {state.admin_password_file})")
    topics = AgentTopics()
    user, password = topics.agent_client(agent), secrets.token_urlsafe(24)
    path = state.agent_password_file(agent)
    async with Identities(admin, f"agents-{os.getpid()}") as identities:
        try:
            await identities.run(identity_commands(user, password, user, topics.agent_acl(agent)))
        except ControlError as exc:
            if "already exists" not in str(exc):
                raise
            raise ControlError(f"agent {agent!r} has a broker user already (its password: {path}); for a new one, "
                               f"`engine agents remove {agent}` first") from None
    write_secret(path, password + "\n", replace=True)
    return BrokerAddress(admin.host, admin.port, user), path


async def remove_agent(state: BrokerState, agent: str) -> None:
    """Take ``agent``'s broker user away (a connected agent is refused from its next connection on)."""
    admin, _ = state.admin()
    async with Identities(admin, f"agents-{os.getpid()}") as identities:
        await identities.run(removal_commands(AgentTopics().agent_client(agent)), absent_ok=True)
    state.agent_password_file(agent).unlink(missing_ok=True)
