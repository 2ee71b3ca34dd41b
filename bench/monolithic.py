"""The monolithic baseline: the diffusers Wan pipeline in one fresh process, as the benchmarks compare against.

    python bench/monolithic.py SPEC.json RESULT.json

SPEC.json: ``{"task", "source", "device", "dtype", "requests": [request dicts], "warmup", "out_dir",
"save_frames"}``. The pipeline loads as the diffusers Wan examples load it (and as the parity tests do): VAE
and CLIP image encoder in float32, the rest in ``dtype``. Each request is one pipeline call plus the same
output writing the engine's decoder node does (MP4, sidecar, and with ``save_frames`` the frames as .npy),
so both sides do the same work. The first ``warmup`` requests run but are reported apart.

RESULT.json: per request the wall and CPU seconds and the seconds of each stage (the pipeline's own
``encode_prompt``, ``encode_image``, ``vae.encode``, ``vae.decode``; ``denoise`` is the rest of the call;
``write`` the output); the resident parameter bytes, the peak RSS (VmHWM) and, on CUDA, the peak allocated
GPU memory; ``time.monotonic()`` marks (system-wide on Linux) of the imports done and the pipeline loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def resident_bytes(modules) -> int:
    """Parameter and buffer bytes, each tensor once (as ``LoadedComponents.parameter_bytes`` counts)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


class StageClock:
    """Wall seconds spent inside wrapped callables, by stage name, for the current request."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attribute: str, stage: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)


def run(spec: dict) -> dict:
    marks = {"started": time.monotonic()}
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPVisionModel

    from engine.families import get_family
    from engine.models.loading import torch_dtype

    marks["imported"] = time.monotonic()
    task, source, device = spec["task"], Path(spec["source"]), spec["device"]
    dtype = torch_dtype(spec["dtype"])
    family = get_family("wan")
    request_type = family.request_type(task)

    # 1. The pipeline as the diffusers Wan examples load it: VAE (and CLIP) in float32.
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    if task == "t2v":
        pipe = WanPipeline.from_pretrained(source, vae=vae, torch_dtype=dtype)
    else:
        image_encoder = CLIPVisionModel.from_pretrained(source / "image_encoder", dtype=torch.float32)
        pipe = WanImageToVideoPipeline.from_pretrained(source, vae=vae, image_encoder=image_encoder, torch_dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    on_cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    sync()
    marks["ready"] = time.monotonic()
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]

    # 2. Stage clocks on the pipeline's own methods.
    clock = StageClock(sync)
    clock.wrap(pipe, "encode_prompt", "text_encode")
    if task == "i2v":
        clock.wrap(pipe, "encode_image", "image_encode")
        clock.wrap(pipe.vae, "encode", "vae_encode")
    clock.wrap(pipe.vae, "decode", "vae_decode")

    # 3. The requests, one after the other.
    from PIL import Image

    out_dir = Path(spec["out_dir"])
    runs = []
    for i, values in enumerate(spec["requests"]):
        request = request_type.model_validate(values)
        extra = {"image": Image.open(request.image).convert("RGB")} if task == "i2v" else {}
        clock.seconds = {}
        wall, cpu = time.perf_counter(), time.process_time()
        frames = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                      width=request.width, num_frames=request.num_frames, num_inference_steps=request.steps,
                      guidance_scale=request.guidance_scale, generator=torch.Generator().manual_seed(request.seed),
                      output_type="np", **extra).frames
        sync()
        call_s = time.perf_counter() - wall
        written = time.perf_counter()
        family.write_output(request, {"frames": torch.from_numpy(frames)}, out_dir, f"m{i + 1}",
                            meta={"request_id": f"m{i + 1}"}, save_frames=spec["save_frames"])
        stages = dict(clock.seconds)
        stages["denoise"] = call_s - sum(stages.values())
        stages["write"] = time.perf_counter() - written
        runs.append({"id": f"m{i + 1}", "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                     "stage_seconds": stages, "warmup": i < spec["warmup"]})
    marks["finished"] = time.monotonic()
    return {
        "marks": marks,
        "param_bytes": resident_bytes(modules),
        "peak_rss_bytes": vm_hwm_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
        "torch_threads": torch.get_num_threads(),
        "requests": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="JSON: task, source, device, dtype, requests, warmup, out_dir, save_frames")
    parser.add_argument("result", type=Path, help="where to write the JSON result")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(json.loads(args.spec.read_text()))
    args.result.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
