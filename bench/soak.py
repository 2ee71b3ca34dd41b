"""A service under steady load for a set time: does any process grow with the job count?

    python bench/soak.py [--minutes 10] [--clients 4] [--sample-s 30] [--warmup-s 120] [--json]

`engine serve graphs/wan_t2v_two_dit.yaml` (encoder | two transformer replicas | decoder, tiny model, the graph's
own small request: 48x64x9, 4 steps; MQTT front on) starts as a subprocess on a free port with its own temporary
state folder. ``--clients`` closed loops each submit a job (``POST /v1/videos``, seeds counting up), follow its
server-sent events to the end and delete it (``DELETE /v1/videos/{id}``: outputs and record gone), then submit the
next, for ``--minutes``. Every ``--sample-s`` seconds the resident memory (RSS) and the open files of every process
of the service are sampled: the service itself, its broker and each worker (named by node and replica). A sample's
RSS is the least of 10 readings 0.3 s apart, what the process holds between two requests (one reading lands in a
request's working set as often as not); the table's maximum is the most of every reading.

Growth is measured from the first sample after ``--warmup-s`` (allocators, caches and pools filled by the first
jobs, and the workers' window of recent answers, 60 s) to the last; per job it is the least-squares slope of RSS
over the jobs completed, across those samples. A service that keeps nothing per job shows a slope near zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchError, emit, finish_machine, graph_path, machine, machine_line, work_dir  # noqa: E402
from bench.serve import READ_TIMEOUT_S, final_event, free_port, serve_command, served  # noqa: E402

LAYOUT = "_two_dit"
MIB = 1 << 20
READINGS = 10  #: readings per sample, ...
READINGS_APART_S = 0.3  #: ... this far apart (a job's decode takes ~0.1-0.3 s here)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load lasts (default: 10)")
    parser.add_argument("--clients", type=int, default=4, help="closed loops submitting jobs (default: 4)")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (default: 30)")
    parser.add_argument("--warmup-s", type=float, default=120.0,
                        help="growth is counted from the first sample after this many seconds (default: 120)")
    parser.add_argument("--model", default="tiny", help="preset or diffusers folder (default: tiny)")
    parser.add_argument("--out", type=Path, help="folder for the service's state and log (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.sample_s <= 0 or args.warmup_s < 0:
        parser.error("--minutes and --sample-s must be above 0, --clients at least 1, --warmup-s 0 or more")
    if args.warmup_s + args.sample_s > args.minutes * 60:
        parser.error("--minutes must leave at least one sample after --warmup-s")
    return args


# -- the processes ----------------------------------------------------------------------------------------------

def process_name(process: Any, service_pid: int) -> str:
    """The service, a worker as ``node-replica`` (its spec file's name), or the executable's name (the broker)."""
    if process.pid == service_pid:
        return "service"
    command = process.cmdline()
    if "engine.worker.worker" in command:
        return Path(command[command.index("engine.worker.worker") + 1]).stem
    return process.name()


def sample(service_pid: int, readings: int = READINGS, apart_s: float = READINGS_APART_S) -> dict[str, dict[str, int]]:
    """Per process of the service (by name): its resident memory as the least of ``readings`` readings
    ``apart_s`` apart and the most of them, and its open files.

    The least is what the process holds between requests: a single reading lands in a request's working set as
    often as not (the decoder's swings by ~60 MiB at this size), which would bury a growth of kilobytes a job."""
    import psutil

    root = psutil.Process(service_pid)
    found: dict[str, dict[str, int]] = {}
    for reading in range(readings):
        if reading:
            time.sleep(apart_s)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if process.name() == "setpriv":
                    continue
                rss, files = process.memory_info().rss, process.num_fds()
                seen = found.setdefault(process_name(process, service_pid), {"rss_bytes": rss, "rss_peak_bytes": rss})
                seen.update(rss_bytes=min(seen["rss_bytes"], rss), rss_peak_bytes=max(seen["rss_peak_bytes"], rss),
                            open_files=files)
    return found


class Sampler:
    """Samples every ``every_s`` seconds on a thread of its own (the load keeps the event loop busy)."""

    def __init__(self, service_pid: int, every_s: float, jobs_done: Any):
        self.service_pid, self.every_s, self.jobs_done = service_pid, every_s, jobs_done
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._take()

    def _take(self) -> None:
        self.samples.append({"seconds": time.monotonic() - self.started, "jobs_completed": self.jobs_done(),
                             "processes": sample(self.service_pid)})


# -- the load ---------------------------------------------------------------------------------------------------

class Load:
    """``clients`` closed loops of submit, follow to the end, delete."""

    def __init__(self, url: str, clients: int, seconds: float):
        self.url, self.clients, self.seconds = url, clients, seconds
        self.completed = 0
        self.failures: list[str] = []

    async def run(self) -> None:
        import httpx

        deadline = time.monotonic() + self.seconds
        timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout) as client:
            await asyncio.gather(*(self._loop(client, first_seed, deadline) for first_seed in range(self.clients)))

    async def _loop(self, client: Any, seed: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            answer = await client.post("/v1/videos", json={"prompt": "a quiet valley at dawn", "seed": seed})
            seed += self.clients
            if answer.status_code != 200:
                self.failures.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
                await asyncio.sleep(1.0)
                continue
            job = await final_event(client, answer.json()["id"])
            if job["status"] == "completed":
                self.completed += 1
            else:
                self.failures.append(f"{job['id']} {job['status']}: {(job.get('error') or {}).get('message')}")
            deleted = await client.delete(f"/v1/videos/{job['id']}")
            if deleted.status_code != 200:
                self.failures.append(f"delete {job['id']}: HTTP {deleted.status_code}")


# -- figures ----------------------------------------------------------------------------------------------------

def growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per process: RSS and open files after warm-up and at the end, and the RSS per job fitted over the samples
    in between (least squares: a slope, not the difference of two samples, which a request's working set in
    flight at either moment would swing)."""
    after = [s for s in samples if s["seconds"] >= warmup_s]
    base, last = after[0], after[-1]
    processes = {}
    for name, end in last["processes"].items():
        points = [(s["jobs_completed"], s["processes"][name]["rss_bytes"]) for s in after if name in s["processes"]]
        if len(points) < len(after):  # started again during the run: nothing to compare
            continue
        start = base["processes"][name]
        processes[name] = {"rss_start_bytes": start["rss_bytes"], "rss_end_bytes": end["rss_bytes"],
                           "rss_growth_bytes": end["rss_bytes"] - start["rss_bytes"],
                           "rss_bytes_per_job": slope(points),
                           "rss_max_bytes": max(s["processes"][name]["rss_peak_bytes"] for s in after),
                           "open_files_start": start["open_files"], "open_files_end": end["open_files"]}
    return {"from_seconds": base["seconds"], "to_seconds": last["seconds"], "samples": len(after),
            "jobs": last["jobs_completed"] - base["jobs_completed"], "processes": processes}


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of y over x; None when x does not vary."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out = work_dir(args.out, "soak")
    graph = graph_path("t2v", LAYOUT)
    port = free_port()
    command = serve_command(graph, [f"model.path={args.model}"], port, out / "state", max(64, args.clients))
    command.remove("--no-mqtt")  # the MQTT front is part of what a service holds
    info = machine()
    with served(command, port, out / "serve.log", None) as service:
        load = Load(service.url, args.clients, args.minutes * 60)
        with Sampler(service.process.pid, args.sample_s, lambda: load.completed) as sampler:
            asyncio.run(load.run())
    if not sampler.samples[-1]["jobs_completed"]:
        raise BenchError(f"no job completed; failures: {load.failures[:3]}")
    return {"benchmark": "soak", "graph": "wan_t2v_two_dit", "model": args.model, "minutes": args.minutes,
            "clients": args.clients, "sample_s": args.sample_s, "warmup_s": args.warmup_s, "completed": load.completed,
            "failed": len(load.failures), "failures": load.failures[:10], "ready_seconds": service.ready_seconds,
            "exit_code": service.exit_code, "growth": growth(sampler.samples, args.warmup_s), "samples": sampler.samples,
            "machine": finish_machine(info), "out": str(out)}


def render(result: dict[str, Any]) -> str:
    from engine.display import table

    grown = result["growth"]
    lines = [f"Soak: engine serve {result['graph']}, model {result['model']}, {result['clients']} clients for "
             f"{result['minutes']:g} min (submit, follow, delete); {result['completed']} jobs completed, "
             f"{result['failed']} failed", ""]
    rows = []
    for name, p in grown["processes"].items():
        per_job = p["rss_bytes_per_job"]
        rows.append([name, f"{p['rss_start_bytes'] / MIB:.1f}", f"{p['rss_end_bytes'] / MIB:.1f}",
                     f"{p['rss_max_bytes'] / MIB:.1f}", f"{p['rss_growth_bytes'] / MIB:+.1f}",
                     "-" if per_job is None else f"{per_job / 1024:+.2f}",
                     f"{p['open_files_start']} -> {p['open_files_end']}"])
    total = {key: sum(p[key] for p in grown["processes"].values()) for key in ("rss_start_bytes", "rss_end_bytes")}
    fitted = [p["rss_bytes_per_job"] for p in grown["processes"].values()]
    rows.append(["all", f"{total['rss_start_bytes'] / MIB:.1f}", f"{total['rss_end_bytes'] / MIB:.1f}", "",
                 f"{(total['rss_end_bytes'] - total['rss_start_bytes']) / MIB:+.1f}",
                 "-" if None in fitted else f"{sum(fitted) / 1024:+.2f}", ""])
    lines.append(table(["process", "RSS MiB after warm-up", "RSS MiB at end", "max MiB", "growth MiB",
                        "KiB per job (fit)", "open files"], rows))
    lines += ["", f"after warm-up: {grown['jobs']} jobs from {grown['from_seconds']:.0f} s to {grown['to_seconds']:.0f} s, "
                  f"{grown['samples']} samples; KiB per job: the least-squares slope of RSS over jobs completed", ""]
    names = list(grown["processes"])
    timeline = [[f"{s['seconds']:.0f}", str(s["jobs_completed"]),
                 *(f"{s['processes'][n]['rss_bytes'] / MIB:.1f}" if n in s["processes"] else "-" for n in names)]
                for s in result["samples"]]
    lines.append(table(["s", "jobs", *(f"{n} MiB" for n in names)], timeline))
    lines += ["", f"service: healthy {result['ready_seconds']:.1f} s after launch; stopped with SIGTERM, exit code "
                  f"{result['exit_code']}"]
    lines += [f"failure: {failure}" for failure in result["failures"][:3]]
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
