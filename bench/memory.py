"""Memory: resident parameter bytes and peak RSS per node against the monolithic pipeline.

    python bench/memory.py [--json] [--height 128 --width 224 --frames 17 --steps 4]

The engine deploys graphs/wan_<task>.yaml on the ``bench`` preset (edge buffers sized for 480x832x81) and runs
one request; per node replica the report gives the parameter and buffer bytes its components hold (the
decoder only the decoder half of the VAE, the encoder only the encoder half) and its peak RSS (VmHWM, weights,
activations, receive pools, interpreter and libraries). The baseline runs the same request through the
diffusers pipeline in a fresh process and reports the same two figures. A third process only imports torch,
diffusers and transformers: the fixed cost every worker process pays.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REAL_480P, add_request_arguments, emit, finish_machine, graph_path, machine, machine_line, make_requests,  # noqa: E402
                          plan_graph, request_values, run_engine, run_monolithic, size_overrides, work_dir)

IMPORTS_ONLY = ("import json, pathlib, torch, diffusers, transformers\n"
                "hwm = next(l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))\n"
                "print(json.dumps(int(hwm.split()[1]) * 1024))")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--out", type=Path, help="folder for outputs and reports (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    return parser.parse_args(argv)


#: The real checkpoint of each task whose configs ship in configs/ (weights counted on the meta device).
REAL_CONFIGS = {"i2v": "configs/wan2.1-i2v-14b-480p", "t2v": "configs/wan2.1-t2v-1.3b"}


def planned_real_weights(graph: Path, task: str) -> dict:
    """Weight bytes per node for the real checkpoint in bfloat16, from its configs (no weights read)."""
    from engine.plan.memory import memory_report

    folder = Path(__file__).resolve().parents[1] / REAL_CONFIGS[task]
    plan, checked, source = plan_graph(graph, [f"model.path={folder}", "model.dtype=bf16", *size_overrides(*REAL_480P)])
    nodes = {m.node: m.weight_bytes for m in memory_report(plan, checked.family, source).nodes}
    return {"model": REAL_CONFIGS[task], "dtype": "bfloat16", "node_weight_bytes": nodes, "total_bytes": sum(nodes.values()),
            "largest_over_total": max(nodes.values()) / sum(nodes.values())}


def imports_only_rss() -> int:
    """Peak RSS of a process that only imports torch, diffusers and transformers."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_ONLY], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    graph = graph_path(args.task)
    out = work_dir(args.out, "memory")
    plan, checked, source = plan_graph(graph, [f"model.path={args.model}", *size_overrides(*REAL_480P)])
    values = request_values(args.task, height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    requests = make_requests(checked, values, 1)
    info = machine()

    report = run_engine(plan, source, requests, out / "engine")
    mono = run_monolithic(args.task, source, requests, out / "monolithic", warmup=0, dtype=plan.dtype)
    nodes = []
    for node in report["nodes"]:
        pools = sum(e.slot_bytes * e.slots for e in plan.edges_into(node["node"]))
        nodes.append({"node": node["node"], "replica": node["replica"], "stages": list(plan.nodes[node["node"]].stages),
                      "param_bytes": node["param_bytes"], "receive_pool_bytes": pools, "peak_rss_bytes": node["peak_rss_bytes"]})
    total_rss = sum(n["peak_rss_bytes"] for n in nodes)
    largest = max(n["peak_rss_bytes"] for n in nodes)
    return {
        "benchmark": "memory",
        "graph": plan.graph,
        "model": args.model,
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps},
        "nodes": nodes,
        "engine": {"param_bytes": sum(n["param_bytes"] for n in nodes), "peak_rss_bytes_sum": total_rss,
                   "peak_rss_bytes_largest": largest},
        "monolithic": {"param_bytes": mono["param_bytes"], "peak_rss_bytes": mono["peak_rss_bytes"]},
        "imports_only_rss_bytes": imports_only_rss(),
        "real_checkpoint": planned_real_weights(graph, args.task),
        "largest_node_over_monolithic": largest / mono["peak_rss_bytes"],
        "sum_over_monolithic": total_rss / mono["peak_rss_bytes"],
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import human_bytes, table

    request = result["request"]
    rows = [[f"{n['node']}[{n['replica']}]", ", ".join(n["stages"]), human_bytes(n["param_bytes"]),
             human_bytes(n["receive_pool_bytes"]), human_bytes(n["peak_rss_bytes"])] for n in result["nodes"]]
    engine, mono = result["engine"], result["monolithic"]
    rows.append(["engine, all nodes", "", human_bytes(engine["param_bytes"]),
                 human_bytes(sum(n["receive_pool_bytes"] for n in result["nodes"])), human_bytes(engine["peak_rss_bytes_sum"])])
    rows.append(["monolithic pipeline", "all", human_bytes(mono["param_bytes"]), "-", human_bytes(mono["peak_rss_bytes"])])
    rows.append(["imports only", "none", "0 B", "-", human_bytes(result["imports_only_rss_bytes"])])
    lines = [f"Memory: {result['graph']}, model {result['model']}, one request of {request['height']}x{request['width']}x"
             f"{request['frames']}, {request['steps']} steps; edge buffers sized for 480x832x81", "",
             table(["process", "stages", "weights", "receive pools", "peak RSS"], rows), "",
             f"largest node / monolithic peak RSS: {result['largest_node_over_monolithic']:.2f}; "
             f"all nodes / monolithic: {result['sum_over_monolithic']:.2f}"]
    real = result["real_checkpoint"]
    lines.append(f"with the real {real['model']} in {real['dtype']} (planned from its configs, no weights read): "
                 + ", ".join(f"{node} {human_bytes(b)}" for node, b in real["node_weight_bytes"].items())
                 + f"; largest node holds {real['largest_over_total'] * 100:.0f}% of {human_bytes(real['total_bytes'])}")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
