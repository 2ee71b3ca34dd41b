"""Serving under open-loop load: `engine serve` of the two-DiT graph at three arrival rates, fixed and elastic, against the pipeline.

    python bench/serve.py [--json] [--jobs 12] [--loads 0.5 1 2 | --rates 30 60 120] [--arrivals poisson|fixed]
                          [--variants fixed elastic] [--elastic decoder] [--max-replicas 2]

The baseline runs first: the same ``--jobs`` jobs (seeds 42, 43, ...) one after another through the diffusers
pipeline in one fresh process, after ``--warmup`` untimed jobs (bench/monolithic.py). Its jobs per minute is the
sequential capacity; a job's latency there is its pipeline call plus output writing (no queue). It runs again after
each service: a shared machine's pace drifts by a fifth over minutes, so each service's ratios are taken against
the mean of the pipeline's runs just before and just after it.

Then `engine serve graphs/wan_<task>_two_dit.yaml` (encoder | two transformer replicas | decoder; the tiny model,
128x224x17 and 4 steps by default; the graph's request defaults and its edge buffers sized for exactly that
request) starts as a subprocess on a free port with its own temporary state folder. Once ``GET /health``
answers 200 and ``--warmup`` jobs have run one at a time (untimed), each rate gets the same jobs, submitted over
HTTP (``POST /v1/videos``; multipart with the image for i2v) at their arrival times without waiting for earlier
ones (open loop; httpx's AsyncClient): at fixed intervals or at exponential ones (a Poisson process,
``--seed``), every rate's intervals the same draws scaled to its mean. Rates are ``--loads`` times the
pipeline's capacity, or ``--rates`` jobs per minute. Each job's completion is read from its server-sent events
(``GET /v1/videos/{id}/events``); its latency is from just before its POST to its ``done`` event (the service
looks at its scheduler every 0.1 s). Per rate: completed jobs per minute (completed jobs over first submission
to last completion), p50 / p99 latency of the completed jobs, and failures (refused at submission, failed,
cancelled or lost). A rate starts once the jobs of the one before have all ended. The service's queue holds
every job of a rate (``--queue-size`` at least ``--jobs``), so none is refused for a full queue.

Two services run in turn, each through every rate: ``fixed``, the graph as it is, and ``elastic``, the same graph
with the ``--elastic`` node (the decoder) at ``replicas: {min: 1, max: --max-replicas}`` and short scaling windows
(``--scale-window-s`` to scale out, the cooldown twice that; ``--scale-in-window-s`` to scale in) that suit jobs of
a second or two. Around each rate the
benchmark reads the service's ``/metrics``: per node, the segments finished, the seconds its replicas were busy on
them and the seconds those waited in a replica's queue first; the scaling decisions; the most replicas each node had
(looked at every 0.5 s). Each worker's torch threads are the engine's CPU budget (its share of the cores by the
work it does); ``--worker-threads N`` fixes them at N for every node (``place.threads``). The pipeline keeps
torch's default (every core). At the end each service gets SIGTERM and must exit with 0; on an error or Ctrl-C it
gets SIGTERM too, then SIGKILL if it has not exited (its workers and broker die with it), and it dies with this
process if this one is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (BenchError, add_request_arguments, emit, finish_machine, graph_path, machine,  # noqa: E402
                          machine_line, percentile, plan_graph, request_values, run_monolithic,
                          sized_for, work_dir)

LAYOUT = "_two_dit"
VARIANTS = ("fixed", "elastic")
FIRST_SEED = 42
WATCH_S = 0.5  #: how often replica counts are read from /metrics during a rate
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
#: Longer than the service's 15 s keep-alive pings on an event stream: no byte for this long means it is stuck.
READ_TIMEOUT_S = 60.0
#: The pipeline's pace moving more than this between its runs around a service marks that service's ratios: the
#: machine's own speed changed more than the comparison can bear.
DRIFT_NOTED = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.set_defaults(task="t2v", model="tiny")
    parser.add_argument("--jobs", type=int, default=12, help="jobs per rate, and timed jobs of the pipeline")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="arrival rates as multiples of the pipeline's sequential capacity (default: 0.5 1 2)")
    parser.add_argument("--rates", type=float, nargs="+", help="arrival rates in jobs per minute (instead of --loads)")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                        help="exponential intervals (a Poisson process) or fixed ones (default: poisson)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the exponential intervals")
    parser.add_argument("--warmup", type=int, default=1, help="untimed jobs per side first, one at a time")
    parser.add_argument("--worker-threads", type=int, help="torch threads per worker process, every node (default: "
                        "the engine's CPU budget)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="services to measure: the graph as it is, and with --elastic between 1 and --max-replicas")
    parser.add_argument("--elastic", default="decoder", help="the node the elastic service scales (default: decoder)")
    parser.add_argument("--max-replicas", type=int, default=2, help="its most replicas (default: 2)")
    parser.add_argument("--scale-window-s", type=float, default=3.0,
                        help="the elastic service's window to scale out; its cooldown is twice that (default: 3)")
    parser.add_argument("--scale-in-window-s", type=float, default=20.0,
                        help="the elastic service's window to scale in (default: 20)")
    parser.add_argument("--out", type=Path, help="folder for the service's state and the pipeline's outputs "
                        "(default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.warmup < 0 or (args.worker_threads is not None and args.worker_threads < 1):
        parser.error("--warmup must be 0 or more, --worker-threads 1 or more")
    if args.max_replicas < 2 or not 0 < args.scale_window_s <= args.scale_in_window_s:
        parser.error("--max-replicas must be at least 2, and 0 < --scale-window-s <= --scale-in-window-s")
    if min(args.rates or args.loads) <= 0:
        parser.error("rates and loads must be above 0")
    return args


# -- the jobs and their arrivals ------------------------------------------------------------------------------

def make_jobs(checked, args: argparse.Namespace) -> list:
    """The benchmark's jobs as the family's requests (the graph's defaults filled in), seeds 42, 43, ..."""
    from engine.controller.requests import build_request

    return [build_request(checked, request_values(args.task, height=args.height, width=args.width, frames=args.frames,
                                                  steps=args.steps, seed=FIRST_SEED + i), f"job {i + 1}")
            for i in range(args.jobs)]


def api_body(request) -> dict[str, Any]:
    """A request as the body of ``POST /v1/videos`` (every field given, so both sides do the same work)."""
    body = request.model_dump(mode="json", exclude_none=True, exclude={"image"})
    body["num_inference_steps"] = body.pop("steps")
    return body


def arrival_offsets(count: int, kind: str, seed: int) -> list[float]:
    """Arrival times in units of the mean interval, the first at 0: fixed, or exponential intervals."""
    draw = random.Random(seed)
    gaps = [1.0 if kind == "fixed" else draw.expovariate(1.0) for _ in range(count - 1)]
    offsets = [0.0]
    for gap in gaps:
        offsets.append(offsets[-1] + gap)
    return offsets


# -- the service ----------------------------------------------------------------------------------------------

@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log_path: Path
    ready_seconds: float = 0.0
    exit_code: int | None = None

    def log_tail(self, lines: int = 15) -> str:
        return "\n    ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(graph: Path, overrides: list[str], port: int, state: Path, queue_size: int) -> list[str]:
    """`engine serve` for this benchmark; under setpriv it gets SIGTERM if this process dies."""
    command = [sys.executable, "-m", "engine.cli", "serve", str(graph), "--port", str(port), "--state-dir", str(state),
               "--queue-size", str(queue_size), "--no-mqtt"]
    for setting in overrides:
        command += ["--set", setting]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


@contextlib.contextmanager
def served(command: list[str], port: int, log_path: Path) -> Iterator[Served]:
    """The service running and healthy; stopped with SIGTERM on the way out (exit code 0 checked when nothing
    else went wrong), killed if it does not stop."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    service = Served(f"http://127.0.0.1:{port}", process, log_path)
    try:
        service.ready_seconds = wait_healthy(service)
        yield service
    except BaseException:
        stop(service)
        raise
    stop(service)
    if service.exit_code != 0:
        raise BenchError(f"engine serve exited with {service.exit_code} after SIGTERM; last log lines ({log_path}):\n"
                         f"    {service.log_tail()}")


def wait_healthy(service: Served) -> float:
    """Seconds from launch until ``GET /health`` answers 200."""
    import httpx

    launched = time.monotonic()
    while time.monotonic() - launched < READY_TIMEOUT_S:
        if service.process.poll() is not None:
            raise BenchError(f"engine serve exited with {service.process.returncode} before it was ready; last log "
                             f"lines ({service.log_path}):\n    {service.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{service.url}/health", timeout=5).status_code == 200:
                return time.monotonic() - launched
        time.sleep(0.25)
    raise BenchError(f"engine serve was not healthy within {READY_TIMEOUT_S:g} s; last log lines "
                     f"({service.log_path}):\n    {service.log_tail()}")


def stop(service: Served) -> None:
    """SIGTERM, wait; SIGKILL if it is still there. Records the exit code."""
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
    service.exit_code = service.process.returncode


# -- open-loop load -------------------------------------------------------------------------------------------

async def submit_and_follow(client, body: dict[str, Any], image: Path | None) -> dict[str, Any]:
    """One job: POST it, follow its events until it ends. Its outcome with monotonic submit and end times."""
    import httpx

    submitted = time.monotonic()
    try:
        if image is None:
            response = await client.post("/v1/videos", json=body)
        else:
            response = await client.post("/v1/videos", data={k: str(v) for k, v in body.items()},
                                          files={"input_reference": (image.name, image.read_bytes(), "image/png")})
        if response.status_code != 200:
            return {"status": "refused", "submitted": submitted, "error": f"HTTP {response.status_code}: "
                    f"{response.json().get('error', {}).get('message', response.text)}"}
        job = await final_event(client, response.json()["id"])
    except httpx.HTTPError as exc:
        return {"status": "lost", "submitted": submitted, "error": f"{type(exc).__name__}: {exc}"}
    error = (job.get("error") or {}).get("message")
    return {"status": job["status"], "submitted": submitted, "ended": time.monotonic(), "id": job["id"], "error": error}


async def final_event(client, job_id: str) -> dict[str, Any]:
    """The job as its ``done`` server-sent event shows it."""
    async with client.stream("GET", f"/v1/videos/{job_id}/events") as response:
        response.raise_for_status()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "done":
                return json.loads(line.removeprefix("data:"))
    raise BenchError(f"the event stream of {job_id} ended before the job did")


async def open_loop(client, bodies: list[dict[str, Any]], offsets: list[float], image: Path | None) -> list[dict[str, Any]]:
    """Submit each job at its offset (seconds from now) without waiting for the others; every outcome."""
    start, jobs = time.monotonic(), []
    for body, offset in zip(bodies, offsets, strict=True):
        await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
        jobs.append(asyncio.create_task(submit_and_follow(client, body, image)))
    return list(await asyncio.gather(*jobs))


async def metrics(client) -> dict[str, dict[tuple[str, ...], float]]:
    """The service's ``/metrics``: family name -> label values, in the order of the labels' names -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get("/metrics")
    response.raise_for_status()
    return {family.name: {tuple(value for _, value in sorted(sample.labels.items())): sample.value
                          for sample in family.samples}
            for family in text_string_to_metric_families(response.text)}


async def watch_replicas(client, peak: dict[str, float]) -> None:
    """Keep the most replicas each node had in ``peak`` until cancelled."""
    while True:
        for (node,), count in (await metrics(client)).get("engine_replicas", {}).items():
            peak[node] = max(peak.get(node, 0.0), count)
        await asyncio.sleep(WATCH_S)


async def measured_rate(client, bodies: list[dict[str, Any]], offsets: list[float], image: Path | None) -> dict[str, Any]:
    """One rate's outcomes, with what ``/metrics`` says changed meanwhile and the most replicas per node."""
    before, peak = await metrics(client), {}
    watching = asyncio.create_task(watch_replicas(client, peak))
    try:
        outcomes = await open_loop(client, bodies, offsets, image)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    after = await metrics(client)

    def change(name: str) -> dict[tuple[str, ...], float]:
        return {labels: value - before.get(name, {}).get(labels, 0.0) for labels, value in after.get(name, {}).items()}

    nodes = {node: {"segments": int(change("engine_node_segments")[(node,)]),
                    "busy_seconds": change("engine_node_busy_seconds")[(node,)],
                    "queue_wait_seconds": change("engine_node_queue_wait_seconds")[(node,)],
                    "peak_replicas": int(peak.get(node, after["engine_replicas"][(node,)]))}
             for (node,) in after["engine_node_segments"]}
    scaling = [{"node": n, "direction": d, "reason": r, "count": int(c)}
               for (d, n, r), c in change("engine_scale_events").items() if c]
    cache = {name: change(f"engine_output_cache_{name}")[()] for name in ("hits", "misses", "saved_seconds")}
    return {"outcomes": outcomes, "nodes": nodes, "scaling": scaling, "output_cache": cache}


async def drive(url: str, bodies: list[dict[str, Any]], image: Path | None, warmup: int, rates: list[float],
                unit_offsets: list[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The warm-up jobs one at a time, then every rate (jobs per minute) in turn: their outcomes and figures."""
    import httpx

    limits = httpx.Limits(max_connections=2 * len(bodies) + 8, max_keepalive_connections=len(bodies) + 4)
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        warm = [await submit_and_follow(client, bodies[i % len(bodies)], image) for i in range(warmup)]
        per_rate = [await measured_rate(client, bodies, [t * 60.0 / rate for t in unit_offsets], image) for rate in rates]
    return warm, per_rate


# -- figures --------------------------------------------------------------------------------------------------

def latency_figures(latencies: list[float]) -> dict[str, Any]:
    return {"latency_seconds": latencies,
            "p50_seconds": percentile(latencies, 50) if latencies else None,
            "p99_seconds": percentile(latencies, 99) if latencies else None}


def rate_figures(rate: float, capacity: float, measured: dict[str, Any]) -> dict[str, Any]:
    outcomes = measured["outcomes"]
    done = [o for o in outcomes if o["status"] == "completed"]
    failed = [o for o in outcomes if o["status"] != "completed"]
    span = max(o["ended"] for o in done) - min(o["submitted"] for o in outcomes) if done else 0.0
    return {"offered_jobs_per_minute": rate, "load": rate / capacity, "jobs": len(outcomes), "completed": len(done),
            "failed": len(failed), "seconds": span, "jobs_per_minute": len(done) / span * 60 if done else 0.0,
            **latency_figures([o["ended"] - o["submitted"] for o in done]),
            "failures": [{"status": o["status"], "error": o["error"]} for o in failed],
            "nodes": measured["nodes"], "scaling": measured["scaling"], "output_cache": measured["output_cache"]}


def monolithic_figures(mono: dict[str, Any]) -> dict[str, Any]:
    timed = [r for r in mono["requests"] if not r["warmup"]]
    seconds = sum(r["seconds"] for r in timed)
    return {"jobs": len(timed), "seconds": seconds, "jobs_per_minute": len(timed) / seconds * 60,
            **latency_figures([r["seconds"] for r in timed]),
            "warmup_seconds": [r["seconds"] for r in mono["requests"] if r["warmup"]], "torch_threads": mono["torch_threads"]}


def bracketing(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The pipeline's pace and p50 around a service: the means of its runs just before and just after it."""
    return {"jobs_per_minute": sum(r["jobs_per_minute"] for r in runs) / len(runs),
            "p50_seconds": sum(r["p50_seconds"] for r in runs) / len(runs)}


def measure(args: argparse.Namespace) -> dict:
    graph = graph_path(args.task, LAYOUT)
    out = work_dir(args.out, "serve")
    overrides = [f"model.path={args.model}", *sized_for(args.height, args.width, args.frames)]
    plan, checked, source = plan_graph(graph, overrides)
    jobs = make_jobs(checked, args)
    info = machine()

    # 1. The pipeline: warm-up, then the jobs one after another; its pace is the sequential capacity.
    def pipeline(run: int) -> dict[str, Any]:
        return monolithic_figures(run_monolithic(args.task, source, [*[jobs[0]] * args.warmup, *jobs],
                                                 out / f"monolithic-{run}", warmup=args.warmup, dtype=plan.dtype))

    pipelines = [pipeline(0)]
    capacity = pipelines[0]["jobs_per_minute"]
    rates = args.rates or [load * capacity for load in args.loads]

    # 2. Each service: launched, healthy, warmed up, then the same jobs at each rate; the pipeline again after it,
    #    so that each service is compared with the pipeline just before and just after it (the machine's pace drifts).
    threads = [f"nodes.{node}.place.threads={args.worker_threads}" for node in plan.nodes
               if node in checked.loaded.spec.nodes] if args.worker_threads else []
    elastic = [f"nodes.{args.elastic}.replicas={{min: 1, max: {args.max_replicas}}}",
               f"scaling.window_s={args.scale_window_s:g}", f"scaling.in_window_s={args.scale_in_window_s:g}",
               f"scaling.cooldown_s={2 * args.scale_window_s:g}"]
    image = jobs[0].image if args.task == "i2v" else None
    services = {}
    for variant in args.variants:
        port = free_port()
        command = serve_command(graph, [*overrides, *threads, *(elastic if variant == "elastic" else [])], port,
                                out / variant / "state", max(64, args.jobs))
        with served(command, port, out / variant / "serve.log") as service:
            warm, per_rate = asyncio.run(drive(service.url, [api_body(j) for j in jobs], image, args.warmup, rates,
                                               arrival_offsets(args.jobs, args.arrivals, args.seed)))
        if any(o["status"] != "completed" for o in warm):
            raise BenchError(f"a warm-up job of the {variant} service did not complete: {warm}")
        pipelines.append(pipeline(len(pipelines)))
        services[variant] = {"ready_seconds": service.ready_seconds, "exit_code": service.exit_code,
                             "warmup_seconds": [o["ended"] - o["submitted"] for o in warm],
                             "baseline": bracketing(pipelines[-2:]),
                             "rates": [rate_figures(r, capacity, m) for r, m in zip(rates, per_rate)]}
    return {
        "benchmark": "serve",
        "graph": plan.graph,
        "nodes": {n.name: n.replicas for n in plan.nodes.values()},
        "model": args.model,
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
                    "guidance_scale": jobs[0].guidance_scale},
        "jobs": args.jobs,
        "warmup": args.warmup,
        "arrivals": args.arrivals,
        "seed": args.seed,
        "capacity_jobs_per_minute": capacity,
        "worker_threads": args.worker_threads,
        "elastic": {"node": args.elastic, "max_replicas": args.max_replicas, "window_s": args.scale_window_s,
                    "in_window_s": args.scale_in_window_s},
        "services": services,
        "monolithic": pipelines[0],
        "monolithic_runs": pipelines,
        "machine": finish_machine(info),
        "out": str(out),
    }


def render(result: dict) -> str:
    from engine.display import table

    request, services, mono = result["request"], result["services"], result["monolithic"]
    nodes = " | ".join(f"{name} x{count}" if count > 1 else name for name, count in result["nodes"].items())
    arrivals = (f"Poisson arrivals (seed {result['seed']})" if result["arrivals"] == "poisson" else "arrivals at fixed intervals")
    elastic = result["elastic"]
    threads = f"{result['worker_threads']} torch thread(s) per worker" if result["worker_threads"] else "CPU budget"
    lines = [f"Serving under open-loop load: engine serve {result['graph']} ({nodes}), model {result['model']}, "
             f"{request['height']}x{request['width']}x{request['frames']}, {request['steps']} steps; "
             f"{result['jobs']} jobs per rate, {arrivals}; {result['warmup']} warm-up job(s) per side; {threads}, "
             f"pipeline {mono['torch_threads']}; elastic: {elastic['node']} 1-{elastic['max_replicas']} replicas, "
             f"out on {elastic['window_s']:g} s, in on {elastic['in_window_s']:g} s", ""]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header, rows = ["load", "offered jobs/min"], []
    for variant in services:
        header += [f"{variant} jobs/min", "p50 s", "p99 s", "failed"]
    header.append(f"{elastic['node']} replicas (most)")
    for i, load in enumerate(r["load"] for r in next(iter(services.values()))["rates"]):
        row = [f"{load:.2g}x", f"{next(iter(services.values()))['rates'][i]['offered_jobs_per_minute']:.1f}"]
        for figures in services.values():
            r = figures["rates"][i]
            row += [f"{r['jobs_per_minute']:.1f}", cell(r["p50_seconds"]), cell(r["p99_seconds"]), str(r["failed"])]
        row.append(" / ".join(str(f["rates"][i]["nodes"][elastic["node"]]["peak_replicas"]) for f in services.values()))
        rows.append(row)
    lines.append(table(header, rows))
    runs = result.get("monolithic_runs", [mono])
    lines += ["", "monolithic, one after another: " + ", then ".join(
        f"{r['jobs_per_minute']:.1f} jobs/min, p50 {cell(r['p50_seconds'])} s" for r in runs)
        + " (before and after each service; the first run's pace is the capacity the loads are multiples of)", ""]
    if all("baseline" in f for f in services.values()):
        ratio_rows = []
        for index, (variant, figures) in enumerate(services.items()):
            base, around = figures["baseline"], runs[index:index + 2]
            drift = max(r["jobs_per_minute"] for r in around) / min(r["jobs_per_minute"] for r in around) - 1
            for r in figures["rates"]:
                ratio_rows.append([variant, f"{r['load']:.2g}x", f"{r['jobs_per_minute'] / base['jobs_per_minute']:.2f}x",
                                   "-" if r["p50_seconds"] is None else f"{r['p50_seconds'] / base['p50_seconds']:.2f}x",
                                   f"{drift:.0%}" + (" (unsteady machine)" if drift > DRIFT_NOTED else "")])
        lines += [table(["service", "load", "jobs/min / pipeline's", "p50 / pipeline's", "pipeline's pace moved"], ratio_rows),
                  "(against the mean of the pipeline's runs just before and just after that service; its pace moved by "
                  "the last column between them)", ""]

    node_names = list(next(iter(services.values()))["rates"][0]["nodes"])
    busy_rows = []
    for variant, figures in services.items():
        for r in figures["rates"]:
            row = [variant, f"{r['load']:.2g}x"]
            for node in node_names:
                n = r["nodes"][node]
                per = max(1, n["segments"])
                row += [f"{n['busy_seconds']:.1f} / {n['busy_seconds'] / per:.2f}", f"{n['queue_wait_seconds'] / per:.2f}"]
            row.append(", ".join(f"{e['node']} {e['direction']} ({e['reason']}) x{e['count']}" for e in r["scaling"]) or "-")
            busy_rows.append(row)
    lines.append(table(["service", "load", *[h for node in node_names for h in (f"{node} busy s / per job", "wait s")],
                        "scaling"], busy_rows))
    lines += ["", "busy: seconds a node's replicas spent on the rate's jobs (stages, sending, writing), in all and per job; "
                  "wait: mean seconds a job waited in a replica's queue there; latency: submit to the done event "
                  "(service), pipeline call plus output writing, no queue (monolithic); p99 of "
                  f"{result['jobs']} jobs is near their maximum",
              "services: " + "; ".join(f"{v} healthy {f['ready_seconds']:.1f} s after launch, exit code {f['exit_code']} "
                                       f"after SIGTERM" for v, f in services.items())]
    for variant, figures in services.items():
        for r in figures["rates"]:
            for failure in r["failures"][:3]:
                lines.append(f"failed ({variant}, {r['load']:.2g}x): {failure['status']}: {failure['error']}")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
