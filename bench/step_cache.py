"""Step caching: DiT passes skipped and seconds saved against the threshold, and PSNR against the exact video.

    python bench/step_cache.py [--json] [--model bench] [--height 128 --width 224 --frames 17 --steps 20]
                               [--methods teacache magcache fbcache] [--thresholds 0.1 0.3 1.0]

One process, the Wan2.1 text-to-video stages of ``--model`` on the CPU (the ``bench`` preset by default: tiny
compute, one transformer block, the real Wan2.1 widths at the edges): the prompt is encoded once, then the denoise
stage runs the request once exactly (``cache: none``) and once per method and threshold, each run's latents decoded
by the VAE stage; a first exact run warms up, untimed, and each setting runs ``--repeats`` times. Per setting: the
denoise stage's median CPU seconds (this process's, on ``--threads`` torch threads: what a shared, loaded machine
distorts least) and wall seconds, DiT passes run and skipped (guidance on: two per step), the seconds saved as the
cache counts them (wall clock, median), and the PSNR of the frames against the exact run's (frames in [0, 1];
``inf``: identical).

Random weights do not behave like trained ones: how much a pass changes from one step to the next, and so which
passes a threshold skips and what that costs in PSNR, says nothing about a real checkpoint. The figures show the
mechanics (skips, time saved per skipped pass, exactness at threshold 0), not quality.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, finish_machine, machine, machine_line, median  # noqa: E402

METHODS = ("teacache", "magcache", "fbcache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", help="preset or diffusers folder (default: the bench preset)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--frames", type=int, default=17, help="4k+1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.1, 0.3, 1.0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the median is shown)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    return parser.parse_args(argv)


def psnr(frames: Any, exact: Any) -> float:
    mse = float(((frames.double() - exact.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engine.errors import ModelError
    from engine.families import get_family
    from engine.plan.model_check import component_configs
    from engine.spec.schema import StepCacheSpec
    from engine.stepcache.stats import collect

    family = get_family("wan")
    source = family.resolve_source("t2v", args.model)
    stage_names = tuple(spec.name for spec in family.stages("t2v"))
    names = tuple(dict.fromkeys(c for spec in family.stages("t2v") for c in spec.components))
    components = family.load_components("t2v", names, source, "cpu", "float32")
    configs = component_configs(family, "t2v", source)
    text, denoise, decode = (family.build_stage("t2v", name, components, "cpu", "float32", configs) for name in stage_names)
    request = family.request_type("t2v")(prompt="a sun rising over a quiet valley, slow camera pan",
                                         negative_prompt="blurry", height=args.height, width=args.width,
                                         num_frames=args.frames, steps=args.steps, guidance_scale=5.0, seed=42)
    embeds = text.run(request, {}, lambda step, total: None)

    def denoised(settings: StepCacheSpec) -> tuple[Any, tuple[float, float], Any]:
        cached = request.model_copy(update={"cache": settings})
        started, started_cpu = time.perf_counter(), time.process_time()
        with collect() as caches:
            latents = denoise.run(cached, embeds, lambda step, total: None)["latents"]
        return latents, (time.perf_counter() - started, time.process_time() - started_cpu), caches[0].stats

    def run(settings: StepCacheSpec) -> dict[str, Any]:
        try:
            samples = [denoised(settings) for _ in range(args.repeats)]
        except ModelError as exc:  # a method this model cannot run (fbcache on one block)
            return {"method": settings.method, "threshold": settings.threshold, "refused": str(exc)}
        latents, _, stats = samples[0]
        frames = decode.run(request, {"latents": latents}, lambda step, total: None)["frames"]
        return {"method": settings.method, "threshold": settings.threshold,
                "denoise_s": round(median([wall for _, (wall, _), _ in samples]), 3),
                "denoise_cpu_s": round(median([cpu for _, (_, cpu), _ in samples]), 3),
                "denoise_s_samples": [round(wall, 3) for _, (wall, _), _ in samples],
                "passes_run": stats.passes_run, "passes_skipped": stats.passes_skipped,
                "seconds_saved": round(median([s.seconds_saved for _, _, s in samples]), 3), "frames": frames}

    denoised(StepCacheSpec(method="none"))  # warm-up
    exact = run(StepCacheSpec(method="none"))
    rows = [exact]
    for method in args.methods:
        rows += [run(StepCacheSpec(method=method, threshold=threshold)) for threshold in args.thresholds]
    for row in rows:
        if "frames" in row:
            row["psnr_db"] = psnr(row.pop("frames"), exact["frames"]) if row is not exact else math.inf
    exact.pop("frames", None)
    return {"model": args.model, "size": f"{args.height}x{args.width}x{args.frames}", "steps": args.steps,
            "repeats": args.repeats, "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"wan t2v on {result['model']}, {result['size']}, {result['steps']} steps, guidance on, median of "
             f"{result['repeats']}; "
             f"{machine_line(result['machine'])}", "",
             "| method | threshold | denoise CPU s | denoise s | passes run | skipped | saved s (counted) | PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    refused = {}
    for row in result["rows"]:
        threshold = "-" if row["method"] == "none" else f"{row['threshold']:g}"
        if "refused" in row:
            refused[row["method"]] = row["refused"]
            continue
        lines.append(f"| {row['method']} | {threshold} | {row['denoise_cpu_s']:.2f} | {row['denoise_s']:.2f} | {row['passes_run']} | "
                     f"{row['passes_skipped']} | {row['seconds_saved']:.2f} | {row['psnr_db']:.1f} |")
    lines += [f"\n{method}: {reason}" for method, reason in refused.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    result = measure(args)
    result["machine"] = finish_machine(info)
    emit(result, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
