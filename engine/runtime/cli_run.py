"""``engine run``: arguments, and the hand-over to the controller."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_run_parser(commands: argparse._SubParsersAction, add_graph_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    run = commands.add_parser(
        "run", help="deploy the graph, run its requests (or the one given), write outputs",
        description="Start the broker (embedded by default), one worker process per node replica, run the graph's "
                    "requests or the one given on the command line, show progress, write the outputs and a run "
                    "report, and stop every process.")
    add_graph_arguments(run)
    request = run.add_argument_group("a request on the command line (replaces the graph's `requests`)")
    request.add_argument("--prompt", help="prompt of the request")
    request.add_argument("--negative-prompt", help="negative prompt")
    request.add_argument("--image", type=Path, help="input image (image-to-video, image edit)")
    request.add_argument("--seed", type=int, help="seed of the initial noise")
    request.add_argument("--steps", type=int, help="denoising steps")
    request.add_argument("--height", type=int, help="output height in pixels")
    request.add_argument("--width", type=int, help="output width in pixels")
    request.add_argument("--num-frames", type=int, help="frames (video models)")
    run.add_argument("--out", type=Path, help="output folder (default: outputs/<run-id>)")
    run.add_argument("--save-frames", action="store_true", help="also save the raw decoded frames as .npy")
    run.add_argument("--quiet", action="store_true", help="no live progress, only the summary")
    run.set_defaults(handler=_run)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    """``engine run``: plan, build the requests, run, write the report, print the summary."""
    from engine.plan.build import plan_graph
    from engine.runtime.controller import RunOptions, run_graph
    from engine.runtime.report import print_summary, write_report
    from engine.runtime.requests import requests_from_args
    from engine.runtime.tracker import State

    plan, checked, source = plan_graph(args.graph, args.overrides)
    requests = requests_from_args(plan, checked, args)
    options = RunOptions(out_dir=Path(args.out) if args.out else Path("outputs"), save_frames=args.save_frames, quiet=args.quiet)
    if not args.out:
        options = dataclasses.replace(options, out_dir=Path("outputs") / options.run_id)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the run as Ctrl-C does: workers torn down
    try:
        result = asyncio.run(run_graph(plan, source, requests, options))
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = write_report(result, plan, source)
    print_summary(result, report)
    return 0 if all(r.state == State.DONE for r in result.requests) else 1
