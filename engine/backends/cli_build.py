"""``engine build GRAPH``: build the artifacts of the graph's backend chains ahead of time, with progress."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_build_parser(commands: argparse._SubParsersAction, add_graph_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    build = commands.add_parser(
        "build", help="export and build the artifacts of the graph's stage backends, ahead of time",
        description="For every node whose `backend` chains name onnxruntime, openvino or tensorrt: load the node's "
                    "components on this host, export each stage's graphs at the input shapes of the graph's requests "
                    "and of its `limits`, build them for each backend, check each against eager (the parity gate) "
                    "and store it in the artifact cache (ENGINE_ARTIFACT_DIR) with its manifest. An artifact already "
                    "there with the same key is kept; a stale one is rebuilt. Exit 1 when one fails to build or fails "
                    "its parity gate (a backend not installed here is listed and passed over).")
    add_graph_arguments(build)
    build.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from engine.backends.build import Built, build_artifacts
    from engine.display import table
    from engine.plan.build import plan_graph, sizing_request

    plan, checked, source = plan_graph(args.graph, args.overrides)
    # The largest request: a request of the graph (its input files) at the sizes of the graph's limits.
    sizing = sizing_request(checked)
    largest = (plan.requests[0].model_copy(update={name: getattr(sizing, name) for name in type(sizing).size_fields})
               if plan.requests else sizing)
    requests = (*plan.requests, largest)

    def progress(built: Built) -> None:
        print(f"{built.node} {built.stage} {built.backend} {built.inputs}: {built.outcome} ({built.seconds:.1f} s)", flush=True)

    done = build_artifacts(plan, checked.family, source, requests, progress)
    if not done:
        print(f"{plan.graph}: no stage of the graph names onnxruntime, openvino or tensorrt in its backend chain")
        return 0
    print()
    print(table(["node", "stage", "backend", "inputs", "outcome", "seconds", "parity"],
                [[b.node, b.stage, b.backend, b.inputs, b.outcome, f"{b.seconds:.1f}", b.parity] for b in done]))
    # A backend that cannot load here (not installed, no such device) is passed over at run time as well.
    fine = ("hit", "built", "rebuilt", "import_error", "probe_failed")
    return 0 if all(b.outcome.startswith(fine) for b in done) else 1
