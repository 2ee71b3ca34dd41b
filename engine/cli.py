"""The ``engine`` command: validate, draw, plan and run graphs.

Heavy libraries (torch, diffusers) are imported only by the commands that need them, so ``--help`` and
``engine validate`` answer at once. Errors a user can cause print one clear message and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from engine import __version__
from engine.errors import EngineError, Interrupted

if TYPE_CHECKING:
    from engine.plan.check import CheckedGraph
    from engine.plan.memory import DeviceFit, MemoryReport, NodeMemory
    from engine.plan.model import Plan
    from engine.stages import ModelFamily

EPILOG = """\
examples:
  engine validate graphs/wan_i2v.yaml
  engine graph graphs/wan_i2v.yaml --out wan_i2v.png
  engine plan graphs/wan_i2v.yaml --set model.path=configs/wan2.1-i2v-14b-480p --set model.dtype=bf16
  engine run graphs/wan_i2v.yaml --prompt "a red fox in snow" --image fox.png --seed 7

--set dotted.key=value overrides any field of the graph file, e.g.
  --set nodes.transformer.replicas=2   --set nodes.encoder.place.device=cuda:1   --set request.steps=20
"""


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", type=Path, help="graph file (YAML), e.g. graphs/wan_i2v.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the graph file (dotted path; repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine", description="Disaggregated diffusion inference: stages of a model as a dataflow graph.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"engine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a graph file and its model's configs, loading no weight",
                                   description="Check schema, stages, placement, edges, devices and requests, and "
                                               "that the family's stages can run the model's configs, and the graph's "
                                               "requests, request defaults and limits at the model's geometry (sizes "
                                               "on its token grid; a preset not built yet is checked when `engine "
                                               "plan` or `engine run` builds it). "
                                               "Exit 0 when valid, 1 with every problem (file:line field) otherwise.")
    _add_graph_arguments(validate)

    graph = commands.add_parser("graph", help="show nodes, stages, placement and what each edge carries",
                                description="Print the graph with the tensors and bytes each edge carries at the "
                                            "graph's largest request, and optionally draw it. The devices of "
                                            "`host: local` nodes must exist on this host.")
    _add_graph_arguments(graph)
    graph.add_argument("--out", type=Path, help="also draw the graph to a .png, .svg or .dot file")

    plan = commands.add_parser("plan", help="weights per node, buffers per edge, fit per device",
                               description="Parameter bytes per node computed from the model configs on the meta "
                                           "device (no weights loaded), edge buffer sizes, and fit against each "
                                           "device's memory (place.memory, or detected on this host). The devices "
                                           "of `host: local` nodes must exist on this host. With --broker, nodes on "
                                           "agents are checked against the memory the live agents offer now, and "
                                           "`place.host: any` nodes are placed as `engine run` would place them.")
    _add_graph_arguments(plan)
    plan.add_argument("--broker", help="the agents' broker (mqtt://user@host:port; the password from --password-file "
                                       "or ENGINE_BROKER_PASSWORD): check fit against the live agents")
    plan.add_argument("--password-file", type=Path, help="the broker user's password, read from this file")
    plan.add_argument("--key-file", type=Path, help="the deployment key, read from this file (default: ENGINE_DEPLOY_KEY)")

    from engine.controller.cli_run import add_run_parser

    add_run_parser(commands, _add_graph_arguments)

    from engine.serve.cli_serve import add_serve_parser

    add_serve_parser(commands, _add_graph_arguments)

    from engine.serve.cli_submit import add_submit_parser

    add_submit_parser(commands)

    from engine.agent.cli import add_agent_parsers

    add_agent_parsers(commands)

    from engine.control.cli_broker import add_broker_parsers

    add_broker_parsers(commands)

    from engine.deploy.cli_deploy import add_deploy_parsers

    add_deploy_parsers(commands, _add_graph_arguments)

    from engine.backends.cli_build import add_build_parser

    add_build_parser(commands, _add_graph_arguments)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.plan.build import sizing_request
    from engine.plan.check import check_graph
    from engine.plan.model_check import check_model, model_source
    from engine.spec.load import load_graph

    checked = check_graph(load_graph(args.graph, args.overrides))
    model = checked.loaded.spec.model
    source = model_source(checked, build=False)
    if source is not None:
        check_model(checked, source, sizing_request(checked))
    spec = checked.loaded.spec
    print(f"{args.graph}: valid ({model.family} {model.task}, {len(spec.nodes)} node(s), "
          f"{len(spec.edges)} edge(s), {len(checked.requests)} request(s))")
    if source is None:
        print(f"model {model.path}: a preset not built yet; `engine plan` or `engine run` builds it and checks its configs")
    else:
        where = "" if str(source) == model.path else f" (at {source})"
        print(f"model {model.path}{where}: its configs fit {model.family} {model.task}, and the graph's requests, "
              "request defaults and limits its geometry")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from engine.display import graph_text, write_picture
    from engine.plan.build import plan_graph

    plan, _, _ = plan_graph(args.graph, args.overrides)
    print(graph_text(plan))
    if args.out:
        write_picture(plan, args.out)
        print(f"\ndrawn to {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from engine.backends.build import chains
    from engine.display import human_bytes, sizing_text, table
    from engine.plan.build import plan_graph
    from engine.plan.memory import memory_report

    plan, checked, source = plan_graph(args.graph, args.overrides)
    report = memory_report(plan, checked.family, source)
    devices, live = list(report.devices), None
    if args.broker:
        plan, devices, live = _fit_on_agents(args, plan, report, checked.family, source)
        report = memory_report(plan, checked.family, source)
    print(f"plan for {plan.graph}: {plan.family} {plan.task}, model {source}, sized at {sizing_text(plan, list(plan.limits))}")
    print("\nweights per node (one replica; counted from the configs on the meta device, no weights read):")
    rows = []
    for node in report.nodes:
        for component, count in node.parameters.items():
            rows.append([node.node, component, f"{count / 1e9:.3f} B" if count else "-",
                         human_bytes(node.weights[component]) if count else "-"])
        kept = f"; {', '.join(node.kept_float32)} kept in float32" if node.kept_float32 else ""
        rows.append([node.node, "total", f"{sum(node.parameters.values()) / 1e9:.3f} B",
                     f"{human_bytes(node.weight_bytes)} ({node.weight_bytes / 1e9:.2f} GB resident; "
                     f"{node.nominal_bytes / 1e9:.2f} GB in {node.dtype}{kept})"])
    print(table(["node", "component", "parameters", "bytes"], rows))
    split = [node for node in report.nodes if node.ranks > 1]
    if split:
        print("\nranks of nodes on several devices (each rank holds the node's weights; its share of the largest request):")
        print(table(["node", "rank", "device", "branch", "tokens", "hidden state", "weights"],
                    [row for node in split for row in _rank_rows(plan, checked, node)]))
    print("\nedge buffers (receiver-owned slots, sized at the largest request):")
    print(table(["edge", "from -> to", "transport", "slot", "slots", "per replica", "sized at"],
                [[e.name, f"{e.source} -> {e.target}", e.transport, f"{e.slot_bytes} ({human_bytes(e.slot_bytes)})", e.slots,
                  human_bytes(e.slot_bytes * e.slots), sizing_text(plan, e.sized_by)] for e in plan.edges]) if plan.edges else "  none")
    backend_rows = list(chains(plan, source))
    if backend_rows:
        print("\nstage backends (first that works runs the stage; built: input shapes in the artifact cache):")
        print(table(["node", "stage", "chain", "built"], backend_rows))
    print("\nfit per device (weights + receive buffers, all replicas; activations not included"
          + (f"; agents: what they offer now, {len(live)} live" if live is not None else "") + "):")
    print(table(["host", "device", "nodes", "needs", "has", "fits"],
                [[d.host, d.device, ", ".join(d.nodes), human_bytes(d.required),
                  human_bytes(d.capacity) if d.capacity is not None else "unknown", _fit_text(d, live)] for d in devices]))
    gone = live is not None and any(d.host != "local" and d.host not in live for d in devices)
    return 0 if all(d.fits is not False for d in devices) and not gone else 1


def _rank_rows(plan: Plan, checked: CheckedGraph, node: NodeMemory) -> list[list[str]]:
    """One row per rank of a several-device node: its guidance branch, its tokens and their hidden state."""
    from engine.display import human_bytes
    from engine.stages import DTYPE_BYTES

    parallel = plan.nodes[node.node].parallel
    sizing = checked.family.request_type(plan.task).model_construct(**plan.limits)
    shape = checked.family.sequence_shape(plan.task, plan.configs, sizing)
    rows = []
    for rank, device in enumerate(node.devices):
        branch, shard = divmod(rank, parallel.ulysses)
        branch_name = ("cond", "uncond")[branch] if parallel.cfg > 1 else "both"
        if shape is None:
            tokens, hidden = "all", "-"
        else:
            share = shape.tokens // parallel.ulysses
            tokens = f"{share} of {shape.tokens}" if parallel.ulysses > 1 else str(shape.tokens)
            hidden = human_bytes(share * shape.hidden * DTYPE_BYTES[node.dtype])
        rows.append([node.node, str(rank), device, branch_name, tokens, hidden, human_bytes(node.weight_bytes)])
    return rows


def _fit_text(device: DeviceFit, live: set[str] | None) -> str:
    if live is not None and device.host != "local" and device.host not in live:
        return f"NO: agent {device.host!r} not live on the broker"
    return {True: "yes", False: "NO", None: "not checked (set place.memory)"}[device.fits]


def _fit_on_agents(args: argparse.Namespace, plan: Plan, report: MemoryReport, family: ModelFamily,
                   source: Path) -> tuple[Plan, list[DeviceFit], set[str]]:
    """``engine plan --broker``: the plan with ``any`` nodes placed on the live agents, the fit of every device
    (agent devices against what they offer now) and the names of the live agents."""
    import asyncio

    from engine.plan.memory import memory_report
    from engine.plan.placement import deploy_needs, fit_on_agents, place_on_agents
    from engine.control.agents import agent_offers, live_agents
    from engine.agent.cli import broker_from, deploy_key_from
    from engine.controller.controller import AGENT_WAIT_S

    broker = broker_from(args)
    births = asyncio.run(live_agents(broker, deploy_key_from(args), AGENT_WAIT_S))
    offers = agent_offers(births, plan.timeouts.lease_s)
    placed = place_on_agents(plan, deploy_needs(plan, report.nodes), offers)
    devices = fit_on_agents(memory_report(placed, family, source).devices, offers)
    return placed, devices, {offer.agent for offer in offers}


def _warn_of_passwords(overrides: list[str]) -> None:
    """A broker password given with --set shows in `ps`: said, with where to put it instead."""
    from engine.control.broker import PASSWORD_ENV, PASSWORD_FILE_ENV, password_in_url

    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "broker" and password_in_url(value):
            print(f"warning: --set broker=...: the password in the URL shows in `ps` to every user of this host; "
                  f"give the user only (mqtt://USER@HOST:PORT) and the password in {PASSWORD_ENV} or in a file "
                  f"named by {PASSWORD_FILE_ENV}", file=sys.stderr)


COMMANDS = {"validate": cmd_validate, "graph": cmd_graph, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # the run command's options come from the installed families
        _warn_of_passwords(getattr(args, "overrides", []))
        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
        return args.handler(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (engine graph ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
