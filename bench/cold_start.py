"""Cold start: from launch to ready, per node, against the monolithic pipeline's process start to loaded.

    python bench/cold_start.py [--json] [--repeats 3] [--broker mosquitto]

Each repeat deploys graphs/wan_<task>.yaml (``bench`` preset, edge buffers sized for 480x832x81) with no
request, against a broker this benchmark starts, and watches every worker's retained status on it (the
controller sees the same messages). Per node replica:

- process start -> ready: from the kernel's start time of the worker process (/proc/<pid>/stat) to its
  ``ready`` status arriving;
- start -> connected: interpreter, torch / diffusers / transformers imports, MQTT connect (``starting`` arrives);
- load: the worker's own figure (components, stages, edge pools; the ``load_seconds`` of the report);
- and for the whole graph the controller's ``ready_seconds`` (broker connect, launching every worker, all ready).

The workers start together and share the cores. The baseline starts ``bench/monolithic.py`` with no request:
process start to the pipeline loaded (same imports, every component). Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REAL_480P, emit, finish_machine, graph_path, machine, machine_line, median,  # noqa: E402
                          plan_graph, run_monolithic, size_overrides, work_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("i2v", "t2v"), default="i2v", help="graphs/wan_<task>.yaml")
    parser.add_argument("--model", default="bench", help="preset or diffusers folder (default: the bench preset)")
    parser.add_argument("--repeats", type=int, default=3, help="deployments (and baseline launches)")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto", help="broker to start")
    parser.add_argument("--out", type=Path, help="folder for the deployments' logs (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start(pid: int) -> float | None:
    """When ``pid`` started, in seconds since boot (the kernel's clock-tick resolution)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


async def watch(address, run_id: str, key: bytes, seen: dict, stop: asyncio.Event) -> None:
    """Record when each replica's status first reaches each state, and its process start time."""
    from engine.control import ControlClient, Topics
    from engine.control.messages import Status

    async with ControlClient(address, client_id=f"{run_id}-observer", key=key) as client:
        await client.subscribe(Topics(run_id).all_status)
        while not stop.is_set():
            inbound = await client.receive(0.05)
            if inbound is None or not isinstance(inbound.message, Status):
                continue
            status, now = inbound.message, boottime()
            entry = seen.setdefault((status.node, status.replica), {"pid": status.pid})
            entry.setdefault(status.state, now)
            if "process_start" not in entry:
                entry["process_start"] = process_start(status.pid)


async def deploy_once(plan, source: Path, out: Path, kind: str) -> dict:
    from engine.control import embedded_broker
    from engine.controller.controller import Controller, RunOptions

    run_id = "cold-" + uuid.uuid4().hex[:8]
    seen: dict = {}
    async with embedded_broker(kind) as address:  # type: ignore[arg-type]
        deployed = dataclasses.replace(plan, broker=f"mqtt://{address.host}:{address.port}")
        controller = Controller(deployed, source, RunOptions(out_dir=out, run_id=run_id, quiet=True))
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(address, run_id, controller.access.key, seen, stop))
        await asyncio.sleep(0.2)  # subscribed before any worker exists
        launched = boottime()
        result = await controller.run([])
        stop.set()
        with contextlib.suppress(Exception):
            await watcher
    nodes = {}
    for (node, replica), info in result.replicas.items():
        entry = seen.get((node, replica), {})
        start = entry.get("process_start")
        if start is None or "ready" not in entry:
            raise RuntimeError(f"{node}[{replica}]: no process start or ready status observed")
        nodes[f"{node}[{replica}]"] = {"start_to_ready": entry["ready"] - start,
                                       "start_to_connected": entry.get("starting", entry["ready"]) - start,
                                       "load": info.load_s, "launch_to_ready": entry["ready"] - launched}
    return {"nodes": nodes, "graph_ready": result.ready_s}


def measure(args: argparse.Namespace) -> dict:
    graph = graph_path(args.task)
    out = work_dir(args.out, "cold-start")
    plan, _, source = plan_graph(graph, [f"model.path={args.model}", *size_overrides(*REAL_480P)])
    info = machine()
    deployments = [asyncio.run(deploy_once(plan, source, out / f"deploy-{i + 1}", args.broker)) for i in range(args.repeats)]
    baselines = []
    for i in range(args.repeats):
        mono = run_monolithic(args.task, source, [], out / f"monolithic-{i + 1}", warmup=0, dtype=plan.dtype)
        baselines.append({"start_to_ready": mono["marks"]["ready"] - mono["launched"],
                          "start_to_imported": mono["marks"]["imported"] - mono["launched"],
                          "load": mono["marks"]["ready"] - mono["marks"]["imported"]})
    keys = ("start_to_connected", "load", "start_to_ready")
    nodes = {name: {k: median([d["nodes"][name][k] for d in deployments]) for k in keys}
             for name in deployments[0]["nodes"]}
    return {
        "benchmark": "cold_start",
        "graph": plan.graph,
        "model": args.model,
        "repeats": args.repeats,
        "nodes": nodes,
        "graph_ready_seconds": median([d["graph_ready"] for d in deployments]),
        "monolithic": {k: median([b[k] for b in baselines]) for k in ("start_to_imported", "load", "start_to_ready")},
        "samples": {"deployments": deployments, "monolithic": baselines},
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import table

    rows = [[name, f"{n['start_to_connected']:.2f}", f"{n['load']:.2f}", f"{n['start_to_ready']:.2f}"]
            for name, n in result["nodes"].items()]
    mono = result["monolithic"]
    rows.append(["monolithic pipeline", f"{mono['start_to_imported']:.2f} (imports)", f"{mono['load']:.2f}",
                 f"{mono['start_to_ready']:.2f}"])
    return "\n".join([
        f"Cold start: {result['graph']}, model {result['model']}, seconds, median of {result['repeats']} "
        "(the workers start together on the same cores)", "",
        table(["process", "start -> connected", "load", "start -> ready"], rows), "",
        f"whole graph, controller start -> every worker ready: {result['graph_ready_seconds']:.2f} s",
        machine_line(result["machine"])])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
