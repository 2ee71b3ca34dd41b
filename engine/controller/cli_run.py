"""``engine run``: arguments, and the hand-over to the controller."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import OutputError
from engine.controller.request_options import add_request_options

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.plan.model import Plan
    from engine.stages import RequestParams

DESCRIPTION = """\
Start the broker (embedded by default), one worker process per node replica, run the graph's requests or the
one given on the command line, show progress, write the outputs and a run report, and stop every process.

Edge buffers are sized for the largest request: each size parameter (e.g. height, width, num_frames) at the
graph's `limits` where it sets one, a ceiling (a larger request is refused: raise the limit, e.g. --set
limits.height=720); else at the largest value the graph's requests and the requests of this run use; the
family's default only where no request gives one. `engine plan` says which limit or request sized each edge.
"""

PREVIEW_EVERY = 2  #: steps between previews for --preview when neither the graph nor a request says

REQUEST_FIELDS = """\
With --prompt: one request, on the graph's `request` defaults, replacing its `requests`. Without: these values
replace those of every request in the graph. The fields are those of every installed model family; a field
the graph's model does not have is refused."""


def add_run_parser(commands: argparse._SubParsersAction, add_graph_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    run = commands.add_parser(
        "run", help="deploy the graph, run its requests (or the one given), write outputs", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(run)
    add_request_options(run, "request fields", REQUEST_FIELDS)
    run.add_argument("--out", type=Path, metavar="FOLDER", help="output folder, created if missing (default: outputs/<run-id>)")
    run.add_argument("--save-frames", action="store_true", help="also save the raw decoded frames as .npy")
    run.add_argument("--quiet", action="store_true", help="no live progress, only the summary")
    run.add_argument("--preview", type=Path, metavar="DIR", help="write every denoising preview there as "
                     "<request>-<stage>-step<k>.jpg (created if missing; the DiT node's preview: {every: N} or "
                     "--preview-every sets how often; without either, every %d steps)" % PREVIEW_EVERY)
    run.set_defaults(handler=_run)


def prepare_output_folder(folder: Path) -> None:
    """Create ``folder`` and write a file in it, so that a folder the run cannot use is refused before any
    process starts rather than after the requests ran."""
    def refuse(why: str) -> OutputError:
        return OutputError(f"output folder {folder}: {why}; choose another with --out")

    try:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise refuse("it is a file, not a folder" if blocking == folder else f"{blocking} is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise refuse(f"cannot create it ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise refuse(f"cannot write in it ({exc.strerror or exc})") from None


def with_previews(requests: list["RequestParams"], plan: "Plan", folder: Path) -> list["RequestParams"]:
    """For ``--preview DIR``: ``folder`` created, and where neither the graph's DiT node nor a request says how often,
    the requests preview every :data:`PREVIEW_EVERY` steps."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"preview folder {folder}: cannot create it ({exc.strerror or exc}); choose another with --preview") from None
    if any(node.preview is not None for node in plan.nodes.values()):
        return requests
    return [r if r.preview_every is not None else r.model_copy(update={"preview_every": PREVIEW_EVERY}) for r in requests]


def _run(args: argparse.Namespace) -> int:
    """``engine run``: check the graph and the requests, plan for them, run, write the report, print the summary."""
    from engine.plan.build import plan_on_this_host
    from engine.plan.check import check_graph
    from engine.controller.controller import RunOptions, run_graph
    from engine.controller.report import print_summary, write_report
    from engine.controller.requests import run_requests
    from engine.controller.tracker import State
    from engine.spec.load import load_graph

    checked = check_graph(load_graph(args.graph, args.overrides))
    requests = run_requests(checked, args.request)
    plan, source = plan_on_this_host(checked, requests)
    if args.preview is not None:
        requests = with_previews(requests, plan, args.preview)
    options = RunOptions(out_dir=Path(args.out) if args.out else Path("outputs"), save_frames=args.save_frames, quiet=args.quiet,
                         preview_dir=args.preview)
    if not args.out:
        options = dataclasses.replace(options, out_dir=Path("outputs") / options.run_id)
    prepare_output_folder(options.out_dir)
    result = asyncio.run(run_graph(plan, source, requests, options))
    report = write_report(result, result.plan, source)
    print_summary(result, report)
    return 0 if all(r.state == State.DONE for r in result.requests) else 1
