"""``engine run``: arguments, and the hand-over to the controller."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


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


def _run(args: argparse.Namespace) -> int:
    from engine.runtime.controller import run_command

    return run_command(args)
