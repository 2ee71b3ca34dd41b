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

from engine.errors import ControlError

KEY_HELP = ("the deployment key shared with the controllers (hex, 32+ bytes), read from this file; default: the "
            "ENGINE_DEPLOY_KEY environment variable")


def add_agent_parsers(commands: argparse._SubParsersAction) -> None:
    agent = commands.add_parser(
        "agent", help="run the workers of remote nodes on this host, on orders from controllers",
        description="Connect to the broker, announce this host (devices, memory, RDMA NICs, model folders) and start "
                    "the engine's workers that a run's controller orders here. Orders must be signed with the "
                    "deployment key; a run's workers are stopped when its controller stops renewing their lease. "
                    "On each host:  ENGINE_DEPLOY_KEY=... engine agent --broker mqtt://user:pass@broker:1883 --name gpu1 "
                    "--device cuda:0 --models /models --address 10.0.0.11")
    agent.add_argument("--broker", required=True, help="the broker, mqtt://user:pass@host:port or mqtts://...")
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
    hosts.add_argument("--broker", required=True, help="the broker, mqtt://user:pass@host:port or mqtts://...")
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


def _agent(args: argparse.Namespace) -> int:
    from engine.control.broker import BrokerAddress, parse_broker
    from engine.control.messages import AGENT_NAME_PATTERN
    from engine.agent.agent import AgentOptions, run_agent
    from engine.spec.schema import parse_memory

    if not re.match(AGENT_NAME_PATTERN, args.name) or args.name in ("any", "local"):
        raise ControlError(f"--name {args.name!r}: letters, digits, . _ - only, and neither 'any' nor 'local' "
                           "(those are placements)")
    broker = parse_broker(args.broker)
    if not isinstance(broker, BrokerAddress):
        raise ControlError("--broker: an agent needs a broker of its own (mqtt://... or mqtts://...), not embedded")
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
    from engine.control.broker import BrokerAddress, parse_broker
    from engine.control.agents import live_agents

    broker = parse_broker(args.broker)
    if not isinstance(broker, BrokerAddress):
        raise ControlError("--broker: give the broker the agents use (mqtt://... or mqtts://...)")
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
