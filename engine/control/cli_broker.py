"""``engine broker`` (a standing broker) and ``engine agents add|remove`` (an agent's own broker user)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from engine.errors import ControlError

STATE_HELP = "the broker's state folder (default: ~/.local/state/engine/broker)"


def add_broker_parsers(commands: argparse._SubParsersAction) -> None:
    broker = commands.add_parser(
        "broker", help="run a broker that outlives runs and services",
        description="Run mosquitto (with its dynamic security plugin; amqtt in-process without mosquitto) until "
                    "Ctrl-C or SIGTERM, its users and secrets kept in a state folder (mode 0700, files 0600). Runs, "
                    "services, `engine hosts` and `engine plan --broker` connect as its user `engine` (password in "
                    "<state>/admin.password); each agent gets a user of its own with `engine agents add NAME`.")
    broker.add_argument("--listen", default="127.0.0.1:1883", metavar="ADDRESS[:PORT]",
                        help="where to listen: an address the agents reach (default: 127.0.0.1:1883)")
    broker.add_argument("--state-dir", type=Path, help=STATE_HELP)
    broker.add_argument("--kind", choices=("auto", "mosquitto", "amqtt"), default="auto",
                        help="auto: mosquitto when installed, else amqtt (default: auto)")
    broker.set_defaults(handler=_broker)

    agents = commands.add_parser(
        "agents", help="give agents broker users of their own on `engine broker`",
        description="`add NAME` makes the broker user agent-NAME, pinned to the agent's client id and confined to "
                    "its topics (its orders, its announcement, answers to runs); the workers it starts get users "
                    "of their own for each run. The password goes to <state>/agents/NAME.password (mode 0600): copy "
                    "it to the agent's host. `remove NAME` takes the user away. The broker must be running.")
    actions = agents.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="make an agent's broker user and print its command line")
    add.add_argument("name", help="the agent's name (its --name)")
    add.add_argument("--address", default="ADDRESS", help="the agent host's address, for the printed command line")
    add.add_argument("--models", default="MODEL_FOLDER", help="its model folder, for the printed command line")
    add.add_argument("--state-dir", type=Path, help=STATE_HELP)
    remove = actions.add_parser("remove", help="take an agent's broker user away")
    remove.add_argument("name")
    remove.add_argument("--state-dir", type=Path, help=STATE_HELP)
    agents.set_defaults(handler=_agents)


def _broker(args: argparse.Namespace) -> int:
    from engine.control.standing import BrokerState, serve_broker

    try:
        where = urlsplit(f"mqtt://{args.listen}")
        host, port = where.hostname, where.port or 1883
    except ValueError as exc:
        raise ControlError(f"--listen {args.listen!r}: {exc}") from None
    if not host or where.username or where.path:
        raise ControlError(f"--listen {args.listen!r}: expected ADDRESS[:PORT]")
    asyncio.run(serve_broker(BrokerState.at(args.state_dir), host, port, args.kind))
    return 0


def _agents(args: argparse.Namespace) -> int:
    from engine.agent.cli import agent_command, check_agent_name
    from engine.control.standing import BrokerState, add_agent, remove_agent

    check_agent_name(args.name)
    state = BrokerState.at(args.state_dir)
    if args.action == "remove":
        asyncio.run(remove_agent(state, args.name))
        print(f"agent {args.name}: its broker user is gone")
        return 0
    address, password_file = asyncio.run(add_agent(state, args.name))
    print(f"agent {args.name}: broker user {address.username}, password in {password_file} (mode 0600)\n"
          f"on its host, with that file copied there:\n  "
          + agent_command(address.url, password_file.name, args.name, address=args.address, models=args.models))
    return 0
