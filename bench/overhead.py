"""Engine overhead: one request's latency through the three-node graph against the monolithic diffusers pipeline.

    python bench/overhead.py [--json] [--repeats 5] [--height 128 --width 224 --frames 17 --steps 4]

The engine side deploys graphs/wan_<task>.yaml (encoder | transformer | decoder, one worker process each, real
broker, real Mooncake edges with xxh3-128 checks) on the ``bench`` preset (tiny compute, the real Wan2.1 480P
edge widths), waits until every worker is ready, then runs 1 + ``--repeats`` identical requests one at a time
(one receive slot per edge, so nothing overlaps). A request's latency is from its first segment's dispatch
to its last segment's completion: deploying and loading are not in it (bench/cold_start.py measures those).

The baseline is the diffusers pipeline (WanImageToVideoPipeline / WanPipeline) from the same model folder in
a fresh process, the same 1 + ``--repeats`` requests, each a pipeline call plus the same output writing the
decoder node does. The first request of each side is a warm-up (``--warmup``), reported apart. Both sides save the frames,
and the last pair is compared (the engine is bit-identical to the pipeline on CPU).

The edge buffers are sized for 480x832x81 (the graph's limits), and the plan's edge tensors at that size are
checked against the real Wan2.1 480P shapes; the measured request itself is smaller by default, because the
bench preset's VAE (diffusers' causal Conv3d, torch's slow CPU path) takes many minutes per 480x832x81
video on a small CPU. Target: median engine / median monolithic <= 1.03.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REAL_480P, add_request_arguments, edges_at_480p, emit, finish_machine, frames_max_diff, graph_path,  # noqa: E402
                          latency, machine, machine_line, make_requests, median, plan_graph, request_values,
                          run_engine, run_monolithic, serial_overrides, size_overrides, work_dir)

TARGET_RATIO = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per side, after the warm-up")
    parser.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="untimed first requests per side")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto", help="embedded broker")
    parser.add_argument("--out", type=Path, help="folder for outputs and reports (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def measure(args: argparse.Namespace) -> dict:
    graph = graph_path(args.task)
    out = work_dir(args.out, "overhead")
    base = [f"model.path={args.model}", *size_overrides(*REAL_480P)]
    overrides = serial_overrides(graph, base)
    plan, checked, source = plan_graph(graph, overrides)
    values = request_values(args.task, height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    requests = make_requests(checked, values, args.warmup + args.repeats)
    w = args.warmup
    info = machine()

    # 1. The engine: deployed once, requests one at a time.
    report = run_engine(plan, source, requests, out / "engine", broker_kind=args.broker, save_frames=True)
    engine_runs = report["requests"]
    engine_s = [latency(r) for r in engine_runs[w:]]

    # 2. The monolithic pipeline, fresh process, same requests.
    mono = run_monolithic(args.task, source, requests, out / "monolithic", warmup=w,
                          dtype=plan.dtype, save_frames=True)
    mono_runs = mono["requests"]
    mono_s = [r["seconds"] for r in mono_runs[w:]]

    # 3. Where the time goes, per side (medians over the timed requests).
    stages = [s for segment in plan.segments for s in segment.stages]
    engine_stage = {s: median([r["stage_seconds"][s] for r in engine_runs[w:]]) for s in stages}
    engine_edges = {e.name: {"seconds": median([r["edges"][e.name]["seconds"] for r in engine_runs[w:]]),
                             "nbytes": engine_runs[-1]["edges"][e.name]["nbytes"]} for e in plan.edges}
    mono_stage = {s: median([r["stage_seconds"][s] for r in mono_runs[w:]]) for s in [*stages, "write"]}
    engine_median, mono_median = median(engine_s), median(mono_s)
    last = len(requests)
    return {
        "benchmark": "overhead",
        "graph": plan.graph,
        "nodes": {n.name: list(n.stages) for n in plan.nodes.values()},
        "sends": {n: [e.name for e in plan.edges_from(n)] for n in plan.nodes},
        "model": args.model,
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
                    "guidance_scale": requests[0].guidance_scale},
        "repeats": args.repeats,
        "warmup": w,
        "broker": args.broker,
        "engine": {"latency_seconds": engine_s, "median_seconds": engine_median, "warmup_seconds": latency(engine_runs[0]) if w else None,
                   "stage_seconds": engine_stage, "edges": engine_edges,
                   "other_seconds": engine_median - sum(engine_stage.values()) - sum(e["seconds"] for e in engine_edges.values())},
        "monolithic": {"latency_seconds": mono_s, "median_seconds": mono_median, "warmup_seconds": mono_runs[0]["seconds"] if w else None,
                       "stage_seconds": mono_stage},
        "ratio": engine_median / mono_median,
        "target_ratio": TARGET_RATIO,
        "frames_max_abs_diff": frames_max_diff(out / "engine" / f"r{last}.npy", out / "monolithic" / f"m{last}.npy"),
        "edges_480p": edges_at_480p(graph, [f"model.path={args.model}"], args.task),
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import human_bytes, table

    request = result["request"]
    engine, mono = result["engine"], result["monolithic"]
    lines = [f"Engine overhead: {result['graph']} in {len(result['nodes'])} nodes "
             f"({' | '.join(', '.join(s) for s in result['nodes'].values())}), model {result['model']}, "
             f"{request['height']}x{request['width']}x{request['frames']}, {request['steps']} steps, "
             f"guidance {request['guidance_scale']:g}",
             f"request latency after ready, seconds, median of {result['repeats']} "
             f"({'after 1 warm-up' if result.get('warmup', 1) else 'no warm-up: first requests'})", ""]
    rows = []
    for node, stages in result["nodes"].items():
        for stage in stages:
            rows.append([f"{node}: {stage}", f"{engine['stage_seconds'][stage]:.3f}", f"{mono['stage_seconds'][stage]:.3f}"])
        for name in result["sends"][node]:
            edge = engine["edges"][name]
            rows.append([f"{name} transfer ({human_bytes(edge['nbytes'])})", f"{edge['seconds']:.3f}", "-"])
    rows.append(["output writing, control, queues", f"{engine['other_seconds']:.3f}", f"{mono['stage_seconds']['write']:.3f}"])
    rows.append(["request (median)", f"{engine['median_seconds']:.3f}", f"{mono['median_seconds']:.3f}"])
    if result.get("warmup", 1):
        rows.append(["warm-up request", f"{engine['warmup_seconds']:.3f}", f"{mono['warmup_seconds']:.3f}"])
    lines.append(table(["", "engine (3 processes)", "monolithic"], rows))
    verdict = "ok" if result["ratio"] <= result["target_ratio"] else "ABOVE TARGET"
    lines += ["", f"ratio engine / monolithic: {result['ratio']:.3f} (target <= {result['target_ratio']}) {verdict}",
              f"engine samples: {', '.join(f'{s:.3f}' for s in engine['latency_seconds'])}; "
              f"monolithic samples: {', '.join(f'{s:.3f}' for s in mono['latency_seconds'])}",
              f"frames of the last request, engine vs monolithic: max |diff| = {result['frames_max_abs_diff']:g}"
              + (" (bit-identical)" if result["frames_max_abs_diff"] == 0 else "")]
    shapes = result["edges_480p"]
    carried = "; ".join(f"{edge}: " + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in tensors.items())
                        for edge, tensors in shapes["edges"].items())
    lines.append(f"edges at {shapes['request']}: {carried} -> "
                 f"{'the real Wan2.1 480P shapes' if shapes['ok'] else 'NOT the Wan2.1 480P shapes'}")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
