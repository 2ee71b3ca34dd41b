"""What the benchmarks share: the graph and its requests, an engine run, the monolithic baseline in a fresh
process, statistics, the machine, and printing a table or JSON.

The engine side is the real thing: ``run_graph`` deploys one worker process per node replica, over a real
broker and real Mooncake edges, exactly as ``engine run``; figures come from its report. The baseline is
``bench/monolithic.py`` in its own process (fresh interpreter, like a worker), on the same model folder,
requests and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

GRAPHS = REPO / "graphs"
IMAGE = GRAPHS / "assets" / "first_frame.png"
PROMPT = "a sun rising over a quiet valley, slow camera pan"


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to (a failed request, a crashed baseline)."""


# -- statistics ---------------------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- the machine ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on, with the load average (other processes share the cores)."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores(), "memory_gib": round(_memory_bytes() / 2**30, 1),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "loadavg_start": os.getloadavg()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["loadavg_end"] = os.getloadavg()[0]
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    load = f"load average {info['loadavg_start']:.1f} -> {info.get('loadavg_end', float('nan')):.1f}"
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB{gpu}; torch {info['torch']} "
            f"({info['torch_threads']} threads); {load}")


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the graph and its requests -------------------------------------------------------------------------------

def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The graph, model and request options the latency benchmarks share (small requests by default)."""
    parser.add_argument("--task", choices=("i2v", "t2v"), default="i2v", help="graphs/wan_<task>.yaml")
    parser.add_argument("--model", default="bench", help="preset or diffusers folder (default: the bench preset)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--frames", type=int, default=17, help="4k+1")
    parser.add_argument("--steps", type=int, default=4)


def graph_path(task: str, layout: str = "") -> Path:
    return GRAPHS / f"wan_{task}{layout}.yaml"


def size_overrides(height: int, width: int, frames: int) -> list[str]:
    """Edge buffers sized for exactly the benchmark's request (the graph's limits)."""
    return [f"limits.height={height}", f"limits.width={width}", f"limits.num_frames={frames}"]


def sized_for(height: int, width: int, frames: int) -> list[str]:
    """The graph's request defaults and its limits at the benchmark's size: the edge buffers hold exactly it (the
    defaults too, so that a size below the graph's own defaults is valid)."""
    defaults = [f"request.height={height}", f"request.width={width}", f"request.num_frames={frames}"]
    return [*defaults, *size_overrides(height, width, frames)]


#: The largest Wan2.1 480P request, and what its edges carry (batch 1, guidance on).
REAL_480P = (480, 832, 81)
_PROMPT = {"prompt_embeds": (1, 512, 4096), "negative_prompt_embeds": (1, 512, 4096)}
EXPECTED_480P_EDGES = {
    "t2v": {"phase1": _PROMPT, "phase2": {"latents": (1, 16, 21, 60, 104)}},
    "i2v": {"phase1": {**_PROMPT, "image_embeds": (1, 257, 1280), "condition": (1, 20, 21, 60, 104)},
            "phase2": {"latents": (1, 16, 21, 60, 104)}},
}


def serial_overrides(graph: Path, base: Sequence[str]) -> list[str]:
    """One receive slot per edge: the controller admits one request at a time (a request's latency
    measured alone, in a deployed graph)."""
    plan, _, _ = plan_graph(graph, base)
    return [*base, *(f"edges.{i}.slots=1" for i in range(len(plan.edges)))]


def edges_at_480p(graph: Path, overrides: Sequence[str], task: str) -> dict[str, Any]:
    """The plan's edge tensors at 480x832x81 against the real Wan2.1 480P shapes (no process, no weights)."""
    plan, _, _ = plan_graph(graph, [*overrides, *size_overrides(*REAL_480P)])
    edges = {e.name: {t.name: list(t.shape) for t in e.tensors} for e in plan.edges}
    expected = {edge: {name: list(shape) for name, shape in tensors.items()} for edge, tensors in EXPECTED_480P_EDGES[task].items()}
    return {"request": "x".join(map(str, REAL_480P)), "edges": edges, "expected": expected, "ok": edges == expected,
            "payload_bytes": {e.name: sum(t.nbytes for t in e.tensors) for e in plan.edges}}


def plan_graph(graph: Path, overrides: Sequence[str]):
    from engine.plan.build import plan_graph as build

    return build(str(graph), list(overrides))


def request_values(task: str, *, height: int, width: int, frames: int, steps: int, seed: int = 42) -> dict[str, Any]:
    values: dict[str, Any] = {"prompt": PROMPT, "height": height, "width": width, "num_frames": frames, "steps": steps,
                              "seed": seed}
    if task == "i2v":
        values["image"] = IMAGE
    return values


def make_requests(checked, values: dict[str, Any], count: int) -> list:
    from engine.controller.requests import build_request

    return [build_request(checked, values, f"benchmark request {i + 1}") for i in range(count)]


# -- running the engine ---------------------------------------------------------------------------------------

def run_engine(plan, source: Path, requests: list, out_dir: Path, *, broker_kind: str = "auto",
               save_frames: bool = False, run_id: str | None = None, worker_threads: int | None = None) -> dict[str, Any]:
    """Deploy, run ``requests``, tear down; the run's report (also written as ``report.json``). With
    ``worker_threads`` each worker process runs torch on that many threads (every node's ``place.threads``), else
    on the engine's CPU budget (its share of the cores by the work it does)."""
    from engine.controller.controller import RunOptions, run_graph
    from engine.controller.report import build_report

    options = RunOptions(out_dir=out_dir, quiet=True, broker_kind=broker_kind, save_frames=save_frames)
    if run_id is not None:
        options = dataclasses.replace(options, run_id=run_id)
    if worker_threads:
        plan = dataclasses.replace(plan, nodes={name: dataclasses.replace(node, threads=worker_threads)
                                                for name, node in plan.nodes.items()})
    result = asyncio.run(run_graph(plan, source, requests, options))
    report = build_report(result, plan, source)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    failed = [r for r in report["requests"] if r["state"] != "done"]
    if failed:
        raise BenchError(f"request {failed[0]['id']} of the engine run failed: {failed[0]['error']}")
    return report


def latency(request: dict[str, Any]) -> float:
    """A request's latency in a deployed graph: first segment dispatched to last segment done."""
    segments = request["segments"]
    return segments[-1]["done"] - segments[0]["dispatched"]


def on_run_clock(request: dict[str, Any], t: float) -> float:
    """A time on the request's clock, on the run's clock (seconds since the controller started)."""
    return request["submitted_seconds"] + t


# -- the monolithic baseline ----------------------------------------------------------------------------------

def run_monolithic(task: str, source: Path, requests: list, out_dir: Path, *, warmup: int, device: str = "cpu",
                   dtype: str = "float32", save_frames: bool = False, timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``bench/monolithic.py`` in a fresh process; its result plus ``launched`` (monotonic, before the fork)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"task": task, "source": str(source), "device": device, "dtype": dtype, "warmup": warmup,
            "requests": [r.model_dump(mode="json") for r in requests], "out_dir": str(out_dir), "save_frames": save_frames}
    spec_path, result_path = out_dir / "spec.json", out_dir / "result.json"
    spec_path.write_text(json.dumps(spec))
    log_path = out_dir / "monolithic.log"
    launched = time.monotonic()
    with log_path.open("w") as log:
        code = subprocess.run([sys.executable, str(REPO / "bench" / "monolithic.py"), str(spec_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code != 0:
        tail = "\n    ".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"the monolithic pipeline exited with code {code}; last log lines ({log_path}):\n    {tail}")
    result = json.loads(result_path.read_text())
    result["launched"] = launched
    return result


def frames_max_diff(engine_frames: Path, monolithic_frames: Path) -> float:
    """Largest absolute difference between two saved frame arrays (0.0: bit-identical)."""
    import numpy as np

    a, b = np.load(engine_frames), np.load(monolithic_frames)
    if a.shape != b.shape:
        raise BenchError(f"engine frames {a.shape} and monolithic frames {b.shape} differ in shape")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# -- output ---------------------------------------------------------------------------------------------------

def work_dir(given: Path | None, name: str) -> Path:
    """Where a run writes its outputs: ``given``, or a fresh temporary folder."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(result, indent=2, default=str) if as_json else render(result))


def seconds(value: float) -> str:
    return f"{value:.3f}"
