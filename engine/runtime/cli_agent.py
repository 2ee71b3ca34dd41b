"""``engine agent`` and ``engine hosts``: arguments, and the hand-over to the agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
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
    agent.add_argument("--models", action="append", type=Path, default=[], metavar="DIR",
                       help="a folder models may be loaded from (repeatable); any other model path is refused")
    agent.add_argument("--address", default="127.0.0.1",
                       help="this host's address that the other hosts reach its workers' data ports at (default: 127.0.0.1)")
    agent.add_argument("--work-dir", type=Path, help="worker specs, logs and outputs (default: a folder under /tmp)")
    agent.add_argument("--key-file", type=Path, help=KEY_HELP)
    agent.set_defaults(handler=_agent)


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
    from engine.runtime.agent import AgentOptions, run_agent

    if not re.match(AGENT_NAME_PATTERN, args.name):
        raise ControlError(f"--name {args.name!r}: letters, digits, . _ - only")
    broker = parse_broker(args.broker)
    if not isinstance(broker, BrokerAddress):
        raise ControlError("--broker: an agent needs a broker of its own (mqtt://... or mqtts://...), not embedded")
    devices = tuple(args.devices or ["cpu"])
    bad = [d for d in devices if not re.fullmatch(r"cpu|(cuda|xpu):\d+", d)]
    if bad:
        raise ControlError(f"--device {bad[0]!r}: expected cpu, cuda:N or xpu:N")
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / f"dge-agent-{args.name}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    options = AgentOptions(name=args.name, broker=broker, deploy_key=deploy_key_from(args), devices=devices,
                           models=tuple(args.models), address=args.address, work_dir=work_dir)
    return asyncio.run(run_agent(options))
