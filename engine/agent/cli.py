"""``engine agent`` and ``engine hosts``: arguments, the hand-over to the agent, and the list of live agents."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ControlError

if TYPE_CHECKING:
    from engine.control.broker import BrokerAddress

KEY_HELP = ("the deployment key shared with the controllers (hex, 32+ bytes), read from this file; default: the "
            "ENGINE_DEPLOY_KEY environment variable")

BROKER_HELP = "the broker, mqtt://user@host:port or mqtts://... (a password in it is refused: it would show in `ps`)"
PASSWORD_HELP = ("the broker user's password, read from this file (default: ENGINE_BROKER_PASSWORD, or the file "
                 "ENGINE_BROKER_PASSWORD_FILE names)")


def add_agent_parsers(commands: argparse._SubParsersAction) -> None:
    agent = commands.add_parser(
        "agent", help="run the workers of remote nodes on this host, on orders from controllers",
        description="Connect to the broker, announce this host (devices, memory, RDMA NICs, model folders) and start "
                    "the engine's workers that a run's controller orders here. Orders must be signed with the "
                    "deployment key; a run's workers are stopped when its controller stops renewing their lease. "
                    "On each host:  ENGINE_DEPLOY_KEY=... engine agent --broker mqtt://agent-gpu1@broker:1883 "
                    "--password-file gpu1.password --name gpu1 --device cuda:0 --models /models --address 10.0.0.11")
    agent.add_argument("--broker", required=True, help=BROKER_HELP)
    agent.add_argument("--password-file", type=Path, help=PASSWORD_HELP)
    agent.add_argument("--name", required=True, help="this host's name, as graphs place nodes on it (place.host)")
    agent.add_argument("--device", dest="devices", action="append", metavar="DEVICE",
                       help="a device nodes may use here (cpu, cuda:N, xpu:N; repeatable; default: cpu)")
    agent.add_argument("--memory", action="append", default=[], metavar="DEVICE=SIZE",
                       help="memory a device offers to `place.host: any` nodes, e.g. cuda:0=40GiB (default: what is free)")
    agent.add_argument("--models", action="append", type=Path, default=[], metavar="DIR",
                       help="a folder models may be loaded from (repeatable); any other model path is refused")
    agent.add_argument("--address", default="127.0.0.1",
                       help="this host's address that the other hosts reach its workers' data ports at (default: 127.0.0.1)")
    agent.add_argument("--work-dir", type=Path, help="worker specs, logs and outputs (default: a folder under /tmp)")
    agent.add_argument("--key-file", type=Path, help=KEY_HELP)
    agent.set_defaults(handler=_agent)

    hosts = commands.add_parser(
        "hosts", help="list the agents on a broker and what they offer",
        description="Listen on the broker for the agents' announcements (signed with the deployment key) and list "
                    "each live agent: its address, devices with memory, RDMA NICs, model folders and the runs it "
                    "has workers of. An agent whose announcement is older than --stale-s is shown as gone.")
    hosts.add_argument("--broker", required=True, help=BROKER_HELP)
    hosts.add_argument("--password-file", type=Path, help=PASSWORD_HELP)
    hosts.add_argument("--key-file", type=Path, help=KEY_HELP)
    hosts.add_argument("--wait-s", type=float, default=3.0, help="how long to listen (agents announce every 2 s)")
    hosts.add_argument("--stale-s", type=float, default=10.0, help="an announcement older than this is an agent gone")
    hosts.set_defaults(handler=_hosts)


def deploy_key_from(args: argparse.Namespace) -> bytes:
    from engine.control.signing import read_key

    if args.key_file is not None:
        try:
            return read_key(args.key_file.read_text(), str(args.key_file))
        except OSError as exc:
            raise ControlError(f"--key-file {args.key_file}: {exc.strerror}") from None
    text = os.environ.get("ENGINE_DEPLOY_KEY")
    if not text:
        raise ControlError("no deployment key: give --key-file or set ENGINE_DEPLOY_KEY")
    return read_key(text, "ENGINE_DEPLOY_KEY")


def agent_command(broker_url: str, password_file: str, name: str, *, address: str, models: str,
                  devices: list[str] | None = None) -> str:
    """The command line that starts agent ``name`` (the deployment key and the password stay off it)."""
    device = "".join(f" --device {d}" for d in devices or [])
    return (f"ENGINE_DEPLOY_KEY=<the deployment key> engine agent --broker {broker_url} --password-file {password_file} "
            f"--name {name}{device} --models {models} --address {address}")


def check_agent_name(name: str) -> None:
    from engine.control.messages import AGENT_NAME_PATTERN

    if not re.match(AGENT_NAME_PATTERN, name) or name in ("any", "local"):
        raise ControlError(f"agent name {name!r}: letters, digits, . _ - only, and neither 'any' nor 'local' "
                           "(those are placements)")


def broker_from(args: argparse.Namespace) -> BrokerAddress:
    """``--broker`` with its password from ``--password-file`` or the environment; a password in the URL refused."""
    from engine.control.broker import BrokerAddress, parse_broker, refuse_password_in_url

    refuse_password_in_url(args.broker, "--broker")
    broker = parse_broker(args.broker, password_file=args.password_file)
    if not isinstance(broker, BrokerAddress):
        raise ControlError("--broker: give the agents' broker (mqtt://... or mqtts://...), not embedded")
    return broker


def _agent(args: argparse.Namespace) -> int:
    from engine.agent.agent import AgentOptions, run_agent
    from engine.spec.schema import parse_memory

    check_agent_name(args.name)
    broker = broker_from(args)
    devices = tuple(args.devices or ["cpu"])
    bad = [d for d in devices if not re.fullmatch(r"cpu|(cuda|xpu):\d+", d)]
    if bad:
        raise ControlError(f"--device {bad[0]!r}: expected cpu, cuda:N or xpu:N")
    memory = {}
    for given in args.memory:
        device, _, size = given.partition("=")
        if device not in devices:
            raise ControlError(f"--memory {given!r}: {device!r} is not one of this agent's devices ({', '.join(devices)})")
        try:
            memory[device] = parse_memory(size)
        except ValueError as exc:
            raise ControlError(f"--memory {given!r}: {exc}") from None
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / f"dge-agent-{args.name}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    options = AgentOptions(name=args.name, broker=broker, deploy_key=deploy_key_from(args), devices=devices,
                           models=tuple(args.models), address=args.address, work_dir=work_dir, memory=memory)
    return asyncio.run(run_agent(options))


def _hosts(args: argparse.Namespace) -> int:
    from engine.control.agents import live_agents

    broker = broker_from(args)
    births = asyncio.run(live_agents(broker, deploy_key_from(args), args.wait_s))
    if not births:
        print(f"no agent announced itself on {broker.display} within {args.wait_s:g} s")
        return 1
    from engine.display import human_bytes, table

    now = time.time()
    rows = [[b.agent, "online" if b.state == "online" and now - b.time < args.stale_s else "gone", b.address,
             ", ".join(f"{d.name} {human_bytes(d.total_bytes)}" if d.total_bytes else d.name for d in b.devices),
             ", ".join(b.rdma_devices) or "-", ", ".join(b.models) or "-", ", ".join(b.running) or "-", b.version]
            for b in sorted(births, key=lambda b: b.agent)]
    print(table(["agent", "state", "address", "devices", "rdma", "models", "runs", "version"], rows))
    return 0
