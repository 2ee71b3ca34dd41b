"""Pipelined throughput: 8 requests through the three-node graph against the monolithic pipeline run 8 times.

    python bench/throughput.py [--json] [--requests 8] [--height 128 --width 224 --frames 17 --steps 4] [--png F]

The engine deploys graphs/wan_<task>.yaml on the ``bench`` preset (edge buffers sized for 480x832x81, three
receive slots per edge: up to three requests in flight) and submits all requests at once; its time is from
the first dispatch to the last completion (deploying and loading not included). The baseline runs the
same requests one after the other through the diffusers pipeline in a fresh process (after loading).
Neither side is warmed up: both pay their first request's one-time costs once.

Beside the measured speed-up, the theoretical bound from the stage times the workers measured in this run:
each node is busy its stages plus its outgoing transfers per request (the final node also writes the output),
requests overlap, so at best one leaves every slowest-node seconds (sum / slowest is what pipelining alone
could give); and at most ``cores / threads per worker`` workers compute at once, so at best one leaves every
``sum * threads / cores`` seconds. The bound is a monolithic request's time over the larger of the two.
Each worker runs torch on ``cores / workers`` threads (at least 1; ``--worker-threads``): workers that each
use every core oversubscribe the CPU as soon as two compute at once, and OpenMP threads spinning against each
other make every stage several times slower. The monolithic pipeline keeps torch's default (every core).
The timeline picture (one lane per node replica, one bar per stage per request, transfers hatched) is drawn
from the engine run's report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REAL_480P, add_request_arguments, cores, emit, finish_machine, graph_path, machine, machine_line,  # noqa: E402
                          make_requests, median, on_run_clock, plan_graph, request_values, run_engine, run_monolithic,
                          size_overrides, work_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--requests", type=int, default=8, help="requests per side")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto", help="embedded broker")
    parser.add_argument("--worker-threads", type=int, help="torch threads per worker process (default: cores / the "
                        "nodes that can compute at once, at least 1; 0: the engine's CPU budget, its share of the "
                        "cores by the work it does)")
    parser.add_argument("--out", type=Path, help="folder for outputs and reports (default: a temporary folder)")
    parser.add_argument("--png", type=Path, help="timeline picture (default: <out>/timeline.png); needs matplotlib")
    parser.add_argument("--no-png", action="store_true", help="do not draw the timeline")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.worker_threads is not None and args.worker_threads < 0:
        parser.error("--worker-threads must be 0 or more")
    return args


def default_worker_threads(plan, n_cores: int) -> int:
    """Threads per worker so that the workers computing at once share the cores without oversubscribing them
    (OpenMP threads that outnumber the cores spin against each other: each stage gets several times slower)."""
    replicas = sum(node.replicas for node in plan.nodes.values())
    return max(1, n_cores // min(replicas, n_cores))


def pipeline_bound(plan, stage_seconds: dict[str, float], edge_seconds: dict[str, float], request_seconds: float,
                   worker_threads: int, n_cores: int) -> dict:
    """The speed-up over ``request_seconds`` (one request alone, monolithic) that pipelining can reach at most.

    A node is busy ``node_seconds`` per request (its stages, the final node's output writing, its outgoing
    transfers; divided among its replicas). Requests overlap, so one leaves at best every slowest-node seconds;
    and at most ``n_cores / worker_threads`` workers compute at once, so at best every
    ``sum * worker_threads / n_cores`` seconds. The bound is ``request_seconds`` over the larger of the two.
    """
    node_seconds = {}
    for node in plan.nodes.values():
        seconds = sum(stage_seconds[s] for s in node.stages)
        if any(s.node == node.name for s in plan.segments if set(s.outputs) & set(plan.final_outputs)):
            seconds += stage_seconds.get("write", 0.0)
        seconds += sum(edge_seconds.get(e.name, 0.0) for e in plan.edges_from(node.name))
        node_seconds[node.name] = seconds / node.replicas
    total, slowest = sum(node_seconds.values()), max(node_seconds.values())
    at_once = n_cores / worker_threads
    period = max(slowest, total / at_once)
    return {"node_seconds": node_seconds, "stages_bound": total / slowest, "cores": n_cores, "worker_threads": worker_threads,
            "workers_at_once": at_once, "period_seconds": period, "request_seconds": request_seconds,
            "bound": request_seconds / period}


def measure(args: argparse.Namespace) -> dict:
    graph = graph_path(args.task)
    out = work_dir(args.out, "throughput")
    plan, checked, source = plan_graph(graph, [f"model.path={args.model}", *size_overrides(*REAL_480P)])
    values = request_values(args.task, height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    requests = make_requests(checked, values, args.requests)
    info = machine()

    # 1. The engine: every request submitted at once, pipelined through the three nodes.
    threads = default_worker_threads(plan, cores()) if args.worker_threads is None else args.worker_threads
    report = run_engine(plan, source, requests, out / "engine", broker_kind=args.broker, worker_threads=threads or None)
    runs = report["requests"]
    first = min(on_run_clock(r, r["segments"][0]["dispatched"]) for r in runs)
    last = max(on_run_clock(r, r["segments"][-1]["done"]) for r in runs)
    engine_s = last - first

    # 2. The monolithic pipeline: the same requests one after the other.
    mono = run_monolithic(args.task, source, requests, out / "monolithic", warmup=0, dtype=plan.dtype)
    mono_runs = mono["requests"]
    mono_s = sum(r["seconds"] for r in mono_runs)

    # 3. The bound, from the stage and transfer times the workers measured in this run (output writing: the
    #    pipeline's), against a monolithic request's time.
    stage_names = [s for segment in plan.segments for s in segment.stages]
    stage_seconds = {s: median([r["stage_seconds"][s] for r in runs]) for s in stage_names}
    stage_seconds["write"] = median([r["stage_seconds"]["write"] for r in mono_runs])
    edge_seconds = {e.name: median([r["edges"][e.name]["seconds"] for r in runs]) for e in plan.edges}
    bound = pipeline_bound(plan, stage_seconds, edge_seconds, median([r["seconds"] for r in mono_runs]),
                           threads or cores(), cores())

    png = None
    if not args.no_png:
        from bench.timeline import draw

        png = str(draw(report, args.png or out / "timeline.png",
                       f"{plan.graph}: {args.requests} requests, {args.height}x{args.width}x{args.frames}, "
                       f"{args.steps} steps, model {args.model}"))
    return {
        "benchmark": "throughput",
        "graph": plan.graph,
        "model": args.model,
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps},
        "requests": args.requests,
        "in_flight": min(e.slots * plan.nodes[e.target].replicas for e in plan.edges),
        "worker_threads": threads or None,
        "engine": {"seconds": engine_s, "requests_per_second": args.requests / engine_s,
                   "latency_seconds": [on_run_clock(r, r["segments"][-1]["done"]) - on_run_clock(r, r["segments"][0]["dispatched"]) for r in runs],
                   "stage_seconds": {s: v for s, v in stage_seconds.items() if s != "write"}, "edge_seconds": edge_seconds},
        "monolithic": {"seconds": mono_s, "requests_per_second": args.requests / mono_s, "torch_threads": mono["torch_threads"],
                       "latency_seconds": [r["seconds"] for r in mono_runs],
                       "stage_seconds": {s: median([r["stage_seconds"][s] for r in mono_runs]) for s in [*stage_names, "write"]},
                       "cpu_seconds_per_wall_second": sum(r["cpu_seconds"] for r in mono_runs) / mono_s},
        "speedup": mono_s / engine_s,
        "bound": bound,
        "timeline_png": png,
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import table

    request, engine, mono, bound = result["request"], result["engine"], result["monolithic"], result["bound"]
    lines = [f"Pipelined throughput: {result['graph']}, model {result['model']}, {result['requests']} requests of "
             f"{request['height']}x{request['width']}x{request['frames']}, {request['steps']} steps "
             f"(engine: up to {result['in_flight']} in flight, "
             f"{result['worker_threads'] or 'default'} torch thread(s) per worker; monolithic: "
             f"{result['monolithic']['torch_threads']} threads; no warm-up on either side)", ""]
    lines.append(table(["", "seconds", "requests/s", "median latency s"], [
        ["engine (3 nodes, pipelined)", f"{engine['seconds']:.2f}", f"{engine['requests_per_second']:.3f}", f"{median(engine['latency_seconds']):.2f}"],
        ["monolithic, one after another", f"{mono['seconds']:.2f}", f"{mono['requests_per_second']:.3f}", f"{median(mono['latency_seconds']):.2f}"],
    ]))
    lines += ["", table(["node", "busy seconds per request (stages, transfers out; the engine's, pipelined)"],
                        [[node, f"{s:.3f}"] for node, s in bound["node_seconds"].items()]), ""]
    lines.append(f"speed-up engine / monolithic: {result['speedup']:.2f}x; theoretical bound {bound['bound']:.2f}x "
                 f"(a monolithic request {bound['request_seconds']:.2f} s / a request every {bound['period_seconds']:.2f} s "
                 f"at best: sum / slowest node {bound['stages_bound']:.2f}x, {bound['cores']} cores / "
                 f"{bound['worker_threads']} thread(s) = {bound['workers_at_once']:g} workers computing at once); "
                 f"{result['speedup'] / bound['bound'] * 100:.0f}% of the bound")
    if result["timeline_png"]:
        lines.append(f"timeline: {result['timeline_png']}")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
