"""Stage backends: each exportable stage, per size, on eager, compile, onnxruntime and openvino (tensorrt on CUDA).

    python bench/backends.py [--json] [--model real|tiny] [--sizes 256x256] [--backends eager,compile,onnxruntime,openvino]
                             [--device cpu|cuda:0] [--repeats 5] [--threads N] [--static]

Per stage and size: milliseconds per call (median of ``--repeats`` after the first), the seconds the first call
spent building (export, build and parity gate; compile: compiling) and loading, and the parity figures against
eager. ``--model real`` runs the VAEs of the real checkpoints' architectures (configs/) with random weights: the
compute of the real model, no download; ``tiny`` runs the tiny presets. Every backend builds into a fresh artifact
cache, so its first build is a cold one; the sizes then run one after the other on the same stage, as a worker
meets them: with the largest of ``--sizes`` as the limits, one artifact with dynamic height and width serves them
all (built at the first size, resident at the next), or with ``--static`` each size builds its own. A backend
slower than eager shows a ratio above 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, emit, finish_machine, machine, machine_line, median  # noqa: E402

#: (family, task, stage, the real checkpoint's configs)
STAGES = (("qwen_image", "t2i", "vae_decode", "configs/qwen-image"), ("z_image", "t2i", "vae_decode", "configs/z-image-turbo"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("real", "tiny"), default="real",
                        help="real: the checkpoints' VAE architectures with random weights; tiny: the tiny presets")
    parser.add_argument("--sizes", default="256x256", help="comma-separated HEIGHTxWIDTH (default 256x256)")
    parser.add_argument("--backends", default="eager,compile,onnxruntime,openvino",
                        help="comma-separated; tensorrt needs a CUDA device (default eager,compile,onnxruntime,openvino)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (default 5)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads, which ONNX Runtime's and OpenVINO's pools "
                                                   "follow (default: torch's default)")
    parser.add_argument("--static", action="store_true", help="one static artifact per size instead of one with "
                                                               "dynamic height and width up to the largest size")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        args.sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: got {args.sizes!r}; expected HEIGHTxWIDTH[,HEIGHTxWIDTH...], e.g. 256x256")
    args.backends = sorted(args.backends.split(","), key=lambda b: b != "eager")  # eager first: the reference
    return args


def load_stage_parts(family_name: str, task: str, stage_name: str, configs_folder: str, model: str, device: str):
    """The family, its stage's components (the VAE) and the model's configs: random weights of the real
    architecture, or the tiny preset."""
    import diffusers
    import torch

    from engine.families import get_family
    from engine.models.meta import read_component_config
    from engine.plan.model_check import component_configs
    from engine.stages import LoadedComponents

    family = get_family(family_name)
    spec = next(s for s in family.stages(task) if s.name == stage_name)
    if model == "tiny":
        source = family.resolve_source(task, "tiny")
        return family, family.load_components(task, spec.components, source, device, "float32"), \
            component_configs(family, task, source), source
    source = REPO / configs_folder
    config = read_component_config(source, "vae")
    torch.manual_seed(0)
    vae = getattr(diffusers, config["_class_name"]).from_config(config).to(device).eval()
    return family, LoadedComponents({name: vae for name in spec.components}), component_configs(family, task, source), source


def stage_inputs(family, task: str, stage_name: str, configs, request, device: str) -> dict[str, Any]:
    """Seeded random tensors of the shapes the stage's inputs have for ``request`` (from the family's declaration)."""
    import torch

    from engine.plan.shapes import evaluate_shape

    stages = family.stages(task)
    produced = {t.name: t for s in stages for t in s.outputs}
    symbols = family.shape_symbols(task, configs, request)
    spec = next(s for s in stages if s.name == stage_name)
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(evaluate_shape(produced[name].shape, symbols), generator=generator).to(device)
            for name in spec.inputs}


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a time is the work's."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import os

    import torch

    from engine.backends.chain import stage_uses, with_backends
    from engine.errors import EngineError

    rows = []
    limits = None if args.static else {"height": max(h for h, _ in args.sizes), "width": max(w for _, w in args.sizes)}
    for family_name, task, stage_name, configs_folder in STAGES:
        family, components, configs, source = load_stage_parts(family_name, task, stage_name, configs_folder,
                                                               args.model, args.device)
        requests = [family.request_type(task).model_validate({"prompt": "x", "height": height, "width": width})
                    for height, width in args.sizes]
        inputs = [stage_inputs(family, task, stage_name, configs, request, args.device) for request in requests]
        references: dict[int, Any] = {}
        for backend in args.backends:
            artifacts = tempfile.TemporaryDirectory(prefix="bench-backends-")  # a cold build, removed after
            os.environ["ENGINE_ARTIFACT_DIR"] = artifacts.name
            stage = family.build_stage(task, stage_name, components, args.device, "float32", configs)
            stage = with_backends(stage, family, task, "bench", (backend,), False, components, args.device, str(source),
                                  limits)
            for index, (request, sized) in enumerate(zip(requests, inputs)):
                row = {"stage": f"{family_name} {stage_name}", "size": f"{request.height}x{request.width}",
                       "backend": backend}
                try:
                    with torch.no_grad():
                        started = time.perf_counter()
                        first = stage.run(request, sized, lambda step, total: None)
                        synchronize(args.device)
                        first_s = time.perf_counter() - started
                        use = stage_uses({stage_name: stage}, (stage_name,)).get(stage_name, {})  # the first call's costs
                        times = []
                        for _ in range(args.repeats):
                            started = time.perf_counter()
                            stage.run(request, sized, lambda step, total: None)
                            synchronize(args.device)
                            times.append((time.perf_counter() - started) * 1e3)
                except EngineError as exc:  # the backend cannot run here (not installed, no such device...)
                    rows.append({**row, "error": str(exc)})
                    continue
                output = next(iter(first.values()))
                reference = references.setdefault(index, output)
                rows.append({**row, "ms_per_call": round(median(times), 2), "first_call_s": round(first_s, 2),
                             "build_s": use.get("build_s", 0.0), "load_s": use.get("load_s", 0.0),
                             "cache": use.get("cache"), "shapes": use.get("shapes"),
                             "max_abs_vs_first": float((output - reference).abs().max()), "parity": use.get("parity")})
            artifacts.cleanup()
    return {"rows": rows}


def render(result: dict[str, Any]) -> str:
    from engine.display import table

    eager = {(r["stage"], r["size"]): r["ms_per_call"] for r in result["rows"] if r["backend"] == "eager"}
    measured = [r for r in result["rows"] if "error" not in r]
    lines = [table(["stage", "size", "backend", "ms/call", "vs eager", "first call s", "build s", "load s", "artifact",
                    "max abs vs eager"],
                   [[r["stage"], r["size"], r["backend"], f"{r['ms_per_call']:.1f}",
                     f"{r['ms_per_call'] / eager[(r['stage'], r['size'])]:.2f}x" if (r["stage"], r["size"]) in eager else "-",
                     f"{r['first_call_s']:.1f}", f"{r['build_s']:.1f}", f"{r['load_s']:.2f}",
                     f"{r['cache']} {r['shapes']}" if r.get("cache") else "-", f"{r['max_abs_vs_first']:.2g}"]
                    for r in measured])]
    lines += [f"{r['stage']} {r['size']} {r['backend']}: not measured: {r['error']}" for r in result["rows"] if "error" in r]
    lines.append("\nvs eager: ms per call over eager's (below 1x: faster); artifact: how the first call had it (built, "
                 "resident: loaded for an earlier size) and its shapes (static, or the range a dynamic one serves); max "
                 "abs vs eager: the stage's output against eager's on the same input")
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    info = machine(args.device)
    result = measure(args)
    result["machine"] = finish_machine(info)
    result["settings"] = {"model": args.model, "sizes": [f"{h}x{w}" for h, w in args.sizes], "repeats": args.repeats,
                          "device": args.device, "static": args.static}
    emit(result, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
