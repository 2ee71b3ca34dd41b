"""The GPU benchmarks at real size: Wan2.1-T2V-1.3B (random weights) through three nodes on one GPU against the
monolithic WanPipeline: request latency (overhead), pipelined throughput, and memory per node.

    python bench/gpu_wan.py [--json] [--steps 4] [--repeats 2] [--requests 4] [--out DIR]

1. Builds a random-weight diffusers folder with the real architecture from ``configs/wan2.1-t2v-1.3b`` (umT5-XXL
   encoder 5.7 B parameters, the 1.3 B DiT, the Wan VAE; the tokenizer is the ByT5 byte tokenizer, as in the
   tiny preset): weights initialised on the GPU, saved in ``--dtype`` (the VAE in float32), about 15 GB on disk.
   ``--model DIR`` reuses a folder built before.
2. Overhead: graphs/wan_t2v.yaml with all three nodes on the GPU (one process each), one receive slot per edge,
   1 + ``--repeats`` requests at 480x832x81 one at a time; the same requests through WanPipeline in a fresh
   process. Latency from the first dispatch to the last segment done; the first request is a warm-up.
3. Throughput: ``--requests`` requests submitted at once (three slots per edge) against the same requests one
   after the other in a fresh pipeline process (both sides cold); the bound from the stage times as in
   bench/throughput.py, with the GPU as the one shared resource (one stage computes at a time).
4. Memory: per node the resident parameter bytes (report) and the peak GPU memory of its process (polled with
   nvidia-smi, CUDA context included), against the pipeline's process; the engine's peak RSS beside it.

Without CUDA it says so and exits 0. ``--device cpu --config <small config folder>`` is a smoke run of the same
code on a CPU (the tests do that with the tiny preset's configs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, emit, finish_machine, graph_path, latency, machine, machine_line,  # noqa: E402
                          make_requests, median, on_run_clock, plan_graph, request_values, run_engine, run_monolithic,
                          serial_overrides, size_overrides, work_dir)

CONFIG = REPO / "configs" / "wan2.1-t2v-1.3b"
TARGET_RATIO = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="diffusers-layout config folder (no weights needed)")
    parser.add_argument("--model", type=Path, help="a random-weight folder built by an earlier run (skips building)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run on a small --config")
    parser.add_argument("--dtype", default="bf16", help="model dtype (the VAE stays float32)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81, help="4k+1")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed single requests per side, after one warm-up")
    parser.add_argument("--requests", type=int, default=4, help="requests of the throughput run (0: skip it)")
    parser.add_argument("--out", type=Path, help="folder for the model, outputs and reports (default: a temporary folder)")
    parser.add_argument("--keep-model", action="store_true", help="keep the built model folder (under --out)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.requests < 0:
        parser.error("--requests must be 0 or more")
    return args


# -- 1. the random-weight model -----------------------------------------------------------------------------------

def build_model(config: Path, dest: Path, device: str, dtype: str) -> Path:
    """A WanPipeline folder with the architecture of ``config`` and random weights (built on ``device``)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from engine.models.loading import torch_dtype
    from engine.spec.schema import DTYPE_NAMES

    target = torch_dtype(DTYPE_NAMES.get(dtype, dtype))
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = in_dtype(UMT5EncoderModel(UMT5Config.from_pretrained(config / "text_encoder")), target)
        transformer = in_dtype(WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(config / "transformer")), target)
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(config / "vae"))
    scheduler = UniPCMultistepScheduler.from_config(UniPCMultistepScheduler.load_config(config / "scheduler"))
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer).save_pretrained(staging)
    staging.rename(dest)
    del text_encoder, transformer, vae
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dest


def in_dtype(model, dtype):
    """``model`` in ``dtype``, except the tensors ``from_pretrained`` keeps in float32 (as loading would leave them)."""
    import torch

    from engine.models.meta import keeps_float32

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keeps_float32(model, name, dtype) else dtype)
    return model


# -- GPU memory per process --------------------------------------------------------------------------------------

class GpuMemoryPoller:
    """Peak GPU memory per process id, polled with nvidia-smi (CUDA context included); empty without it."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak: dict[int, int] = {}
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuMemoryPoller":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    pid, mib = int(parts[0]), int(parts[1]) << 20
                    self.peak[pid] = max(self.peak.get(pid, 0), mib)
            self._stop.wait(self.interval_s)


# -- 2-4. the runs ----------------------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> dict:
    out = work_dir(args.out, "gpu-wan")
    device = "cuda:0" if args.device == "cuda" else args.device
    info = machine(device)

    # 1. The model.
    started = time.perf_counter()
    model = args.model or build_model(args.config, out / "model", device, args.dtype)
    build_s = time.perf_counter() - started if args.model is None else 0.0

    graph = graph_path("t2v")
    sizes = {"height": args.height, "width": args.width, "num_frames": args.frames}
    base = [f"model.path={model}", f"model.dtype={args.dtype}", *size_overrides(args.height, args.width, args.frames),
            *(f"request.{name}={value}" for name, value in sizes.items()),
            *(f"nodes.{node}.place.device={device}" for node in ("encoder", "transformer", "decoder"))]
    plan, checked, source = plan_graph(graph, serial_overrides(graph, base))
    values = request_values("t2v", height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    single = make_requests(checked, values, 1 + args.repeats)
    batch = make_requests(checked, values, args.requests)

    # 2. Overhead: the engine one request at a time, then the pipeline (single requests, then the batch).
    with GpuMemoryPoller() as serial_gpu:
        report = run_engine(plan, source, single, out / "engine-serial")
    engine_s = [latency(r) for r in report["requests"][1:]]
    with GpuMemoryPoller() as mono_gpu:
        mono = run_monolithic("t2v", source, single, out / "monolithic", warmup=1, device=device, dtype=plan.dtype)
    mono_single = mono["requests"]
    mono_s = [r["seconds"] for r in mono_single[1:]]
    stages = [s for segment in plan.segments for s in segment.stages]
    result = {
        "benchmark": "gpu_wan",
        "model": {"config": str(args.config), "folder": str(model), "dtype": args.dtype, "build_seconds": build_s},
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps},
        "overhead": {
            "engine_seconds": engine_s, "monolithic_seconds": mono_s,
            "engine_median": median(engine_s), "monolithic_median": median(mono_s),
            "ratio": median(engine_s) / median(mono_s), "target_ratio": TARGET_RATIO,
            "engine_stage_seconds": {s: median([r["stage_seconds"][s] for r in report["requests"][1:]]) for s in stages},
            "monolithic_stage_seconds": {s: median([r["stage_seconds"][s] for r in mono_single[1:]]) for s in [*stages, "write"]},
            "edges": {e.name: {"nbytes": report["requests"][-1]["edges"][e.name]["nbytes"],
                               "seconds": median([r["edges"][e.name]["seconds"] for r in report["requests"][1:]])} for e in plan.edges},
        },
    }

    # 3. Throughput: the batch submitted at once, three slots per edge.
    if batch:
        from bench.throughput import pipeline_bound

        pipelined, _, _ = plan_graph(graph, base)
        with GpuMemoryPoller() as batch_gpu:
            batch_report = run_engine(pipelined, source, batch, out / "engine-batch")
        # A fresh pipeline process, cold as the freshly deployed workers are.
        mono_batch = run_monolithic("t2v", source, batch, out / "monolithic-batch", warmup=0, device=device,
                                    dtype=plan.dtype)["requests"]
        runs = batch_report["requests"]
        engine_total = (max(on_run_clock(r, r["segments"][-1]["done"]) for r in runs)
                        - min(on_run_clock(r, r["segments"][0]["dispatched"]) for r in runs))
        mono_total = sum(r["seconds"] for r in mono_batch)
        stage_seconds = {s: median([r["stage_seconds"][s] for r in runs]) for s in stages}
        stage_seconds["write"] = median([r["stage_seconds"]["write"] for r in mono_batch])
        edge_seconds = {e.name: median([r["edges"][e.name]["seconds"] for r in runs]) for e in plan.edges}
        # One GPU: one stage computes at a time (as one core with one thread).
        bound = pipeline_bound(pipelined, stage_seconds, edge_seconds, median([r["seconds"] for r in mono_batch]), 1, 1)
        result["throughput"] = {"requests": len(batch), "engine_seconds": engine_total, "monolithic_seconds": mono_total,
                                "speedup": mono_total / engine_total, "node_seconds": bound["node_seconds"],
                                "stages_bound": bound["stages_bound"], "bound": bound["bound"]}
        peaks = {**serial_gpu.peak, **{pid: max(v, serial_gpu.peak.get(pid, 0)) for pid, v in batch_gpu.peak.items()}}
        node_reports = [report["nodes"], batch_report["nodes"]]
    else:
        peaks, node_reports = serial_gpu.peak, [report["nodes"]]

    # 4. Memory per node (the peak over the engine runs) against the pipeline's process.
    nodes = {}
    for listing in node_reports:
        for node in listing:
            name = f"{node['node']}[{node['replica']}]"
            entry = nodes.setdefault(name, {"param_bytes": node["param_bytes"], "peak_rss_bytes": 0, "peak_gpu_bytes": None})
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], node["peak_rss_bytes"])
            if node["pid"] in peaks:
                entry["peak_gpu_bytes"] = max(entry["peak_gpu_bytes"] or 0, peaks[node["pid"]])
    result["memory"] = {"nodes": nodes, "monolithic": {"param_bytes": mono["param_bytes"], "peak_rss_bytes": mono["peak_rss_bytes"],
                                                       "peak_gpu_bytes": max(mono_gpu.peak.values(), default=None),
                                                       "peak_allocated_bytes": mono["peak_gpu_bytes"]},
                        "gpu_polling": serial_gpu.available}
    result["machine"] = finish_machine(info)
    result["out"] = str(out)
    if args.model is None and not args.keep_model:
        shutil.rmtree(model, ignore_errors=True)
    return result


def render(result: dict) -> str:
    from engine.display import human_bytes, table

    request, over = result["request"], result["overhead"]
    lines = [f"Wan2.1-T2V-1.3B architecture, random weights ({result['model']['dtype']}), three nodes on one device; "
             f"{request['height']}x{request['width']}x{request['frames']}, {request['steps']} steps", ""]
    rows = [[s, f"{over['engine_stage_seconds'][s]:.3f}", f"{over['monolithic_stage_seconds'][s]:.3f}"] for s in over["engine_stage_seconds"]]
    rows += [[f"{name} transfer ({human_bytes(e['nbytes'])})", f"{e['seconds']:.3f}", "-"] for name, e in over["edges"].items()]
    rows.append(["request (median)", f"{over['engine_median']:.3f}", f"{over['monolithic_median']:.3f}"])
    lines.append(table(["overhead, seconds", "engine", "monolithic"], rows))
    verdict = "ok" if over["ratio"] <= over["target_ratio"] else "ABOVE TARGET"
    lines += ["", f"ratio engine / monolithic: {over['ratio']:.3f} (target <= {over['target_ratio']}) {verdict}"]
    if "throughput" in result:
        t = result["throughput"]
        lines += ["", f"throughput, {t['requests']} requests: engine {t['engine_seconds']:.2f} s, monolithic "
                      f"{t['monolithic_seconds']:.2f} s: {t['speedup']:.2f}x (bound {t['bound']:.2f}x, one stage on the GPU at a "
                      f"time; sum / slowest node {t['stages_bound']:.2f}x: "
                      + ", ".join(f"{n} {s:.2f} s" for n, s in t["node_seconds"].items()) + " per request)"]
    memory = result["memory"]
    gpu = lambda b: human_bytes(b) if b is not None else "n/a"  # noqa: E731
    rows = [[name, human_bytes(n["param_bytes"]), gpu(n["peak_gpu_bytes"]), human_bytes(n["peak_rss_bytes"])]
            for name, n in memory["nodes"].items()]
    mono = memory["monolithic"]
    rows.append(["monolithic", human_bytes(mono["param_bytes"]), gpu(mono["peak_gpu_bytes"]), human_bytes(mono["peak_rss_bytes"])])
    lines += ["", table(["memory", "weights", "peak GPU (nvidia-smi)", "peak RSS"], rows)]
    if result["model"]["build_seconds"]:
        lines.append(f"model built in {result['model']['build_seconds']:.0f} s")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        message = "CUDA is not available on this machine: nothing measured (run this on a CUDA GPU)"
        print(json.dumps({"skipped": message}) if args.json else message)
        return 0
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
