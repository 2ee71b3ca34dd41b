"""The output cache on a trace of repeated prompts with one shared negative prompt: hit rate, seconds saved, frames.

    python bench/cache.py [--json] [--requests 12] [--prompts 4] [--task t2v] [--model tiny] [--height ...]

The trace: ``--requests`` requests whose prompts cycle through ``--prompts`` different ones (request i has prompt
i mod ``--prompts``), every one with the graph's negative prompt and guidance on, seeds 42, 43, ... The engine runs
it twice through graphs/wan_<task>.yaml, with every node's output cache (the default 256 MiB) and with none
(``output_cache=0B``), the raw frames saved. Per side: the cache's hits, misses and seconds saved from the run's
report, per part of the text encoding (the prompt's embedding, the negative prompt's: cached each by its own text)
its hits and hit rate, the median ``text_encode`` seconds of the requests whose parts all hit, whose negative prompt
alone hit (a new prompt), and whose parts all missed, and the run's seconds from first dispatch to last
completion; then whether every request's frames are equal on both sides. The shared negative prompt hits from the
second request on; a prompt hits when it repeats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_request_arguments, emit, finish_machine, graph_path, machine, machine_line, median,  # noqa: E402
                          on_run_clock, plan_graph, request_values, run_engine, sized_for, work_dir)

PROMPTS = ["a sun rising over a quiet valley, slow camera pan", "a red fox running through fresh snow",
           "waves breaking on black rocks at dusk", "a paper boat drifting down a rain gutter",
           "a lighthouse beam sweeping through fog", "bees over a field of lavender"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.set_defaults(task="t2v", model="tiny")
    parser.add_argument("--requests", type=int, default=12, help="requests in the trace")
    parser.add_argument("--prompts", type=int, default=4, help=f"different prompts in it (1-{len(PROMPTS)})")
    parser.add_argument("--out", type=Path, help="folder for both runs (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.requests < 1 or not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--requests must be at least 1 and --prompts from 1 to {len(PROMPTS)}")
    return args


PARTS = ("text_encode/prompt", "text_encode/negative_prompt")
#: text_encode seconds by which parts hit: all, the negative prompt's alone (a new prompt), none
HIT_KINDS = {"all": set(PARTS), "negative": {PARTS[1]}, "none": set()}


def side(report: dict[str, Any]) -> dict[str, Any]:
    runs = report["requests"]
    seconds = {kind: median(found) if (found := [r["stage_seconds"]["text_encode"] for r in runs
                                                 if set(r["output_cache"]["hits"]) == hits]) else None
               for kind, hits in HIT_KINDS.items()}
    parts = report["output_cache"]["parts"]
    first = min(on_run_clock(r, r["segments"][0]["dispatched"]) for r in runs)
    last = max(on_run_clock(r, r["segments"][-1]["done"]) for r in runs)
    return {**report["output_cache"],
            "hit_rate": {part: parts[part]["hits"] / len(runs) if part in parts else 0.0 for part in PARTS},
            "text_encode_seconds": seconds, "seconds": last - first}


def measure(args: argparse.Namespace) -> dict:
    import numpy as np

    from engine.controller.requests import build_request

    out = work_dir(args.out, "cache")
    sized = sized_for(args.height, args.width, args.frames)
    trace = [dict(request_values(args.task, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                                 seed=42 + i), prompt=PROMPTS[i % args.prompts]) for i in range(args.requests)]
    info = machine()
    sides = {}
    for name, cache in (("cached", []), ("uncached", ["nodes.encoder.output_cache=0B"])):
        plan, checked, source = plan_graph(graph_path(args.task), [f"model.path={args.model}", *sized, *cache])
        requests = [build_request(checked, values, f"trace request {i + 1}") for i, values in enumerate(trace)]
        sides[name] = side(run_engine(plan, source, requests, out / name, save_frames=True))
    equal = all(np.array_equal(np.load(out / "cached" / f"r{i}.npy"), np.load(out / "uncached" / f"r{i}.npy"))
                for i in range(1, args.requests + 1))
    return {"benchmark": "cache", "graph": plan.graph, "model": args.model, "requests": args.requests,
            "prompts": args.prompts, "request": {"height": args.height, "width": args.width, "frames": args.frames,
                                                 "steps": args.steps},
            "negative_prompt": requests[0].negative_prompt, **sides, "frames_equal": equal,
            "machine": finish_machine(info), "out": str(out)}


def render(result: dict) -> str:
    from engine.display import table

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    request = result["request"]
    def part(s: dict, name: str) -> str:
        hits = s["parts"].get(name, {}).get("hits", 0)
        return f"{hits} ({s['hit_rate'][name]:.0%})"

    rows = [[name, part(s, PARTS[0]), part(s, PARTS[1]), str(s["misses"]), f"{s['saved_seconds']:.3f}",
             *(cell(s["text_encode_seconds"][kind]) for kind in HIT_KINDS), f"{s['seconds']:.2f}"]
            for name, s in ((n, result[n]) for n in ("cached", "uncached"))]
    return "\n".join([
        f"Output cache: {result['requests']} requests through {result['graph']} (model {result['model']}, "
        f"{request['height']}x{request['width']}x{request['frames']}, {request['steps']} steps), {result['prompts']} "
        f"different prompts in turn, every one with the negative prompt {result['negative_prompt']!r}", "",
        table(["", "prompt hits", "negative prompt hits", "misses", "saved s", "text_encode s (both hit)",
               "(negative hit)", "(none hit)", "run s"], rows),
        "", f"frames equal with and without the cache, every request: {result['frames_equal']}",
        machine_line(result["machine"])])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
