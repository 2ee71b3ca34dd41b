"""Time one Wan2.1-T2V-1.3B denoising step: the engine's denoise stage against the diffusers pipeline.

Builds the real 1.3B transformer architecture (from ``configs/wan2.1-t2v-1.3b``: 30 layers, 12 heads x
128 = 1536 wide, ffn 8960, text_dim 4096) with random weights on the GPU in bfloat16 (the modules
diffusers keeps in float32 stay float32, as ``from_pretrained`` leaves them), then runs the same
denoising steps at 480x832x81 (32,760 tokens, guidance on: two transformer forwards per step) through

- ``diffusers``: ``WanPipeline`` holding only the transformer and scheduler, fed prompt embeddings;
- ``engine``: the ``denoise`` stage of ``nodes.wan`` over the same module and scheduler config.

A step's time is the interval between two consecutive end-of-step callbacks (after a CUDA sync); the
first step of each run is left out (it includes set-up). The implementations alternate over
``--repeats`` runs so that clock and thermal drift hit both. Prints a table, or JSON with ``--json``.

    python bench/gpu_wan_step.py [--steps 4] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "wan2.1-t2v-1.3b"
TARGET_RATIO = 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="diffusers-layout config folder (no weights needed)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run on a small --config")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each implementation, alternating")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    return args


def build_transformer(config: Path, device: str):
    """The real architecture with random weights, bfloat16 except the modules diffusers keeps in float32."""
    import torch
    from diffusers import WanTransformer3DModel

    from engine.models.meta import keeps_float32

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(config / "transformer"))
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name and keeps_float32(model, name, torch.bfloat16):
            module.to(torch.float32)
    return model.eval().requires_grad_(False)


def step_times(run, device: str) -> list[float]:
    """Seconds between consecutive end-of-step marks of ``run(mark)``, which calls ``mark()`` after each step."""
    import torch

    marks: list[float] = []
    on_cuda = device.startswith("cuda")

    def mark() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)  # a step is over when its kernels are, not when they are queued
        marks.append(time.perf_counter())

    run(mark)
    return [b - a for a, b in zip(marks, marks[1:])]


def measure(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from engine.plan.model_check import component_configs
    from engine.stages import LoadedComponents
    from nodes.wan.family import TEXT_LEN, WanFamily, WanRequest
    from nodes.wan.stages import build_stage

    # 1. One transformer and one scheduler config shared by both implementations.
    transformer = build_transformer(args.config, args.device)
    scheduler_config = UniPCMultistepScheduler.load_config(args.config / "scheduler")
    text_dim = transformer.config.text_dim
    generator = torch.Generator(device=args.device).manual_seed(0)
    prompt_embeds, negative_prompt_embeds = (
        torch.randn(1, TEXT_LEN, text_dim, generator=generator, device=args.device, dtype=torch.bfloat16) for _ in range(2)
    )
    request = WanRequest(
        prompt="bench", height=args.height, width=args.width, num_frames=args.frames, steps=args.steps,
        guidance_scale=args.guidance_scale,
    )

    # 2. The monolithic pipeline, from prompt embeddings to latents.
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=UniPCMultistepScheduler.from_config(scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers(mark) -> None:
        def on_step_end(pipeline, step, timestep, tensors):
            mark()
            return {}

        pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, height=args.height,
            width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(0), output_type="latent",
            callback_on_step_end=on_step_end,
        )

    # 3. The engine's denoise stage over the same components.
    components = LoadedComponents({"transformer": transformer, "scheduler": UniPCMultistepScheduler.from_config(scheduler_config)})
    configs = component_configs(WanFamily(), "t2v", args.config)
    stage = build_stage("t2v", "denoise", components, args.device, "bfloat16", configs)
    inputs = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    def run_engine(mark) -> None:
        stage.run(request, inputs, lambda step, total: mark())

    # 4. Alternate the two, collecting every timed step.
    times: dict[str, list[float]] = {"diffusers": [], "engine": []}
    for _ in range(args.repeats):
        times["diffusers"] += step_times(run_diffusers, args.device)
        times["engine"] += step_times(run_engine, args.device)

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "device": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu",
        "shape": {"height": args.height, "width": args.width, "frames": args.frames},
        "tokens": ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16),
        "guidance_scale": args.guidance_scale,
        "step_seconds": {name: {"median": medians[name], "min": min(times[name]), "samples": len(times[name])} for name in times},
        "ratio": medians["engine"] / medians["diffusers"],
        "target_ratio": TARGET_RATIO,
    }


def print_table(result: dict) -> None:
    shape = result["shape"]
    print(f"Wan2.1-T2V denoising step on {result['device']}: {shape['height']}x{shape['width']}x{shape['frames']}, "
          f"{result['tokens']} tokens, guidance {result['guidance_scale']} (2 forwards per step), bfloat16")
    print(f"{'implementation':<16}{'median s/step':>15}{'min s/step':>12}{'steps':>7}")
    for name, row in result["step_seconds"].items():
        print(f"{name:<16}{row['median']:>15.4f}{row['min']:>12.4f}{row['samples']:>7}")
    verdict = "ok" if result["ratio"] <= result["target_ratio"] else "ABOVE TARGET"
    print(f"ratio engine / diffusers: {result['ratio']:.4f} (target <= {result['target_ratio']}) {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        message = "CUDA is not available on this machine: nothing measured (run this on a CUDA GPU)"
        print(json.dumps({"skipped": message}) if args.json else message)
        return 0
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
