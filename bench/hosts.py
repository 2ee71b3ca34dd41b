"""Several hosts: one request's latency with the encoder and the DiT on two other hosts, against all nodes on one.

    sudo python bench/hosts.py [--json] [--repeats 3] [--height 128 --width 224 --frames 17 --steps 4]

Both sides deploy graphs/wan_<task>.yaml on the ``bench`` preset (tiny compute, the real Wan2.1 480P edge widths,
edge buffers sized for 480x832x81) against the same mosquitto, and run 1 + ``--repeats`` identical requests one at
a time. The several-hosts side puts the encoder on host h1 and the transformer on h2, each a Linux network
namespace with its own address and an `engine agent`, joined by veth pairs on a bridge (bench/netns.py); the
decoder and the controller stay in the root namespace. Every edge then crosses a veth over Mooncake TCP. The
one-host side runs every node locally. Per request: latency from the first dispatch to the last segment's end
(deploying is not in it), and each edge's GB/s (payload bytes over the time from grant request to
acknowledgement). Medians over the timed requests. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REAL_480P, add_request_arguments, emit, finish_machine, graph_path, latency, machine, machine_line,  # noqa: E402
                          make_requests, median, plan_graph, request_values, serial_overrides, size_overrides,
                          work_dir)
from bench.netns import namespace_hosts  # noqa: E402

PLACEMENT = {"encoder": "h1", "transformer": "h2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per side, after one warm-up")
    parser.add_argument("--out", type=Path, help="folder for outputs and reports (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def run_side(cluster, graph: Path, overrides: list[str], requests: list, out: Path) -> dict:
    """`engine run` of the requests with these overrides (in a process of its own, as a user runs it)."""
    out.mkdir(parents=True, exist_ok=True)
    graph_file = out / "graph.yaml"
    spec = yaml.safe_load(graph.read_text())
    spec["requests"] = [request.model_dump(mode="json", exclude_none=True) for request in requests]
    graph_file.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "engine.cli", "run", str(graph_file), "--out", str(out / "run"), "--quiet",
               "--set", f"broker={cluster.broker}"]
    for setting in overrides:
        command += ["--set", setting]
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"engine run failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "run" / "report.json").read_text())


def measure(args: argparse.Namespace) -> dict:
    from engine.families import get_family

    if os.geteuid() != 0:
        raise SystemExit("bench/hosts.py makes network namespaces: run it as root")
    graph = graph_path(args.task)
    out = work_dir(args.out, "hosts")
    overrides = serial_overrides(graph, [f"model.path={args.model}", *size_overrides(*REAL_480P)])
    plan, checked, source = plan_graph(graph, overrides)
    values = request_values(args.task, height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    requests = make_requests(checked, values, 1 + args.repeats)
    info = machine()
    models = get_family("wan").resolve_source(args.task, args.model).parent
    with namespace_hosts(Path(tempfile.mkdtemp(prefix="dge-hosts-")), list(PLACEMENT.values()), models) as cluster:
        one = run_side(cluster, graph, overrides, requests, out / "one-host")
        spread = run_side(cluster, graph, [*overrides, *(f"nodes.{n}.place.host={h}" for n, h in PLACEMENT.items())],
                          requests, out / "three-hosts")

    def figures(report: dict) -> dict:
        timed = report["requests"][1:]
        edges = {name: median([r["edges"][name]["nbytes"] / r["edges"][name]["seconds"] / 1e9 for r in timed])
                 for name in timed[0]["edges"]}
        return {"latency_seconds": [latency(r) for r in timed], "median_seconds": median([latency(r) for r in timed]),
                "edge_gbps": edges, "edge_bytes": {name: e["nbytes"] for name, e in timed[0]["edges"].items()},
                "hosts": {n["node"]: n["host"] for n in report["nodes"]}}

    one_host, three_hosts = figures(one), figures(spread)
    return {
        "benchmark": "hosts",
        "graph": plan.graph,
        "model": args.model,
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps},
        "repeats": args.repeats,
        "one_host": one_host,
        "three_hosts": three_hosts,
        "ratio": three_hosts["median_seconds"] / one_host["median_seconds"],
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import human_bytes, table

    request = result["request"]
    one, three = result["one_host"], result["three_hosts"]
    rows = [["request latency, s (median)", f"{one['median_seconds']:.3f}", f"{three['median_seconds']:.3f}"]]
    for name, nbytes in three["edge_bytes"].items():  # I2V: the first frame crosses to h1 on an edge of its own (inputs)
        here = one["edge_gbps"].get(name)
        rows.append([f"{name} GB/s ({human_bytes(nbytes)})", "-" if here is None else f"{here:.2f}",
                     f"{three['edge_gbps'][name]:.2f}"])
    placed = ", ".join(f"{node} on {host}" for node, host in three["hosts"].items())
    return "\n".join([
        f"Several hosts: {result['graph']}, model {result['model']}, {request['height']}x{request['width']}x"
        f"{request['frames']}, {request['steps']} steps, median of {result['repeats']} after a warm-up; {placed}",
        "",
        table(["", "one host", "three hosts (veth)"], rows),
        "",
        f"ratio three hosts / one host: {result['ratio']:.3f}",
        machine_line(result["machine"]),
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
