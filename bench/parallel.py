"""A DiT split across devices: seconds per guided denoising step and memory per device, one device against CFG
parallel, Ulysses and both.

    python bench/parallel.py [--json] [--devices cpu,cpu,cpu,cpu] [--height 128 --width 224 --frames 17]
                             [--steps 5] [--model SYNTHETIC|FOLDER] [--dtype fp32]

Each layout (1 device; cfg 2; ulysses 2; cfg 2 x ulysses 2; ulysses 4, where the devices and the heads allow) starts
one process per rank, joined as the engine joins a node's ranks (engine.worker.group: gloo on CPU, NCCL on CUDA),
with the transformer split as the engine's Wan denoise stage splits it (engine.parallel, nodes.wan.parallel). Each
process runs ``--steps`` guided steps (the conditional and the unconditional prediction, combined) after one
warm-up step; the table gives the median step time of rank 0, the peak memory of each rank (resident set on CPU,
torch's peak allocation on CUDA), and the largest difference of the final prediction from the one-device run
(0 means bit-identical). On CPU every rank of every layout runs with the same torch thread count (``--threads``,
by default the cores over the largest layout's ranks), so that all layouts run the same kernels.

The default model is a random Wan transformer of a useful width (8 heads of 64, 4 blocks; ``--model synthetic``);
``--model FOLDER`` loads a diffusers Wan folder's transformer (a real checkpoint on a GPU host). On a CPU the ranks
share the same cores, so no speed-up is expected there: the figures show the cost of the exchange, and the same
script measures the gain on GPUs (``--devices cuda:0,cuda:1,cuda:2,cuda:3``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cores, emit, finish_machine, machine, machine_line, median  # noqa: E402

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2), (1, 4))  #: (cfg, ulysses)
SYNTHETIC = {"num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 4, "ffn_dim": 2048, "text_dim": 512,
             "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "freq_dim": 256,
             "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
TEXT_TOKENS = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cpu,cpu,cpu", help="the devices ranks may use, comma-separated")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--model", default="synthetic", help="synthetic, or a diffusers Wan folder")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, help="torch threads per rank on CPU (default: the cores over the "
                                                    "largest layout's ranks, the same for every layout)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- one rank -------------------------------------------------------------------------------------------------------


def load_transformer(model: str, device: str, dtype):
    import torch
    from diffusers import WanTransformer3DModel

    if model == "synthetic":
        torch.manual_seed(0)
        model = WanTransformer3DModel(**SYNTHETIC)
        return (model if dtype == torch.float32 else model.to(dtype)).to(device).eval()
    return WanTransformer3DModel.from_pretrained(Path(model) / "transformer", torch_dtype=dtype).to(device).eval()


def run_rank(args: argparse.Namespace) -> None:
    import torch

    from engine.parallel import SINGLE
    from engine.spec.schema import Parallel
    from engine.worker.group import join_group
    from nodes.wan.parallel import split_sequence

    cfg, ulysses = map(int, args.layout.split(","))
    devices = tuple(args.devices.split(","))[:cfg * ulysses]
    device = devices[args.rank]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device == "cpu":
        torch.set_num_threads(args.threads)
    transformer = load_transformer(args.model, device, dtype)
    split = SINGLE
    if len(devices) > 1:
        split = join_group(devices, Parallel(cfg=cfg, ulysses=ulysses), args.rank, args.port, timeout_s=600)
        if ulysses > 1:
            split_sequence(transformer, split)

    config = transformer.config
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8,
                          generator=generator).to(device, dtype)
    embeds = [torch.randn(1, TEXT_TOKENS, config.text_dim, generator=generator).to(device, dtype) for _ in range(2)]
    timestep = torch.tensor([500.0], device=device)

    def step():
        branches = [lambda e=e: transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=e,
                                            return_dict=False)[0] for e in embeds]
        cond, uncond = split.predict(branches)
        return uncond + 5.0 * (cond - uncond)

    times = []
    with torch.no_grad():
        for _ in range(args.steps + 1):
            _sync(device)
            started = time.perf_counter()
            prediction = step()
            _sync(device)
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else _peak_rss()
    result = {"rank": args.rank, "device": device, "step_s": median(times[1:]), "peak_bytes": peak}
    if args.rank == 0:
        torch.save(prediction.float().cpu(), args.result.with_suffix(".pt"))
    args.result.with_suffix(f".{args.rank}.json").write_text(json.dumps(result))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the layouts ------------------------------------------------------------------------------------------------------


def run_layout(args: argparse.Namespace, cfg: int, ulysses: int, out: Path) -> dict:
    from engine.worker.group import open_store

    ranks = cfg * ulysses
    store = open_store(ranks) if ranks > 1 else None
    result = out / f"cfg{cfg}-ulysses{ulysses}"
    common = [sys.executable, __file__, "--devices", args.devices, "--height", str(args.height), "--width", str(args.width),
              "--frames", str(args.frames), "--steps", str(args.steps), "--model", args.model, "--dtype", args.dtype,
              "--threads", str(args.threads), "--layout", f"{cfg},{ulysses}", "--port", str(store.port if store else 0), "--result", str(result)]
    processes = [subprocess.Popen([*common, "--rank", str(rank)]) for rank in range(ranks)]
    codes = [p.wait() for p in processes]
    if any(codes):
        raise SystemExit(f"layout cfg {cfg} x ulysses {ulysses}: a rank exited with {codes}")
    per_rank = [json.loads(result.with_suffix(f".{rank}.json").read_text()) for rank in range(ranks)]
    return {"cfg": cfg, "ulysses": ulysses, "ranks": ranks, "step_s": per_rank[0]["step_s"],
            "peak_bytes": [r["peak_bytes"] for r in per_rank], "devices": [r["device"] for r in per_rank],
            "prediction": str(result.with_suffix(".pt"))}


def measure(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    devices = args.devices.split(",")
    largest = max(c * u for c, u in LAYOUTS if c * u <= len(devices))
    args.threads = args.threads or max(1, cores() // largest)
    heads = SYNTHETIC["num_attention_heads"] if args.model == "synthetic" else \
        json.loads((Path(args.model) / "transformer" / "config.json").read_text())["num_attention_heads"]
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
    info = machine(devices[0])
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for cfg, ulysses in LAYOUTS:
            if cfg * ulysses > len(devices) or heads % ulysses or tokens % ulysses:
                continue
            row = run_layout(args, cfg, ulysses, Path(out))
            rows.append(row)
        reference = torch.load(rows[0]["prediction"])
        for row in rows:
            row["max_abs_diff"] = float((torch.load(row.pop("prediction")) - reference).abs().max())
            row["speedup"] = rows[0]["step_s"] / row["step_s"]
    return {"machine": finish_machine(info), "model": args.model, "dtype": args.dtype, "tokens": tokens, "heads": heads,
            "threads_per_rank": args.threads,
            "size": [args.height, args.width, args.frames], "steps": args.steps, "layouts": rows}


def render(result: dict) -> str:
    from engine.display import human_bytes, table

    rows = [[f"cfg {r['cfg']} x ulysses {r['ulysses']}", r["ranks"], ", ".join(r["devices"]), f"{r['step_s']:.3f}",
             f"{r['speedup']:.2f}x", ", ".join(human_bytes(b) for b in r["peak_bytes"]), f"{r['max_abs_diff']:.1e}"]
             for r in result["layouts"]]
    height, width, frames = result["size"]
    return (f"DiT step (cond + uncond) at {height}x{width}x{frames} ({result['tokens']} tokens, {result['heads']} heads), "
            f"model {result['model']} {result['dtype']}, median of {result['steps']} steps, "
            f"{result['threads_per_rank']} torch thread(s) per CPU rank\n"
            + table(["layout", "ranks", "devices", "step s", "vs 1", "peak memory per rank", "max abs diff"], rows)
            + "\n" + machine_line(result["machine"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank is not None:
        run_rank(args)
        return 0
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
