"""Streamed video: how soon a served Wan job shows something, against when its whole video exists.

`engine serve graphs/wan_<task>.yaml` (the bench preset by default, its limits at the largest size measured) takes
one job per size, one after another. For each, from the moment it was submitted: the first ``preview`` server-sent
event (a preview every ``--preview-every`` steps; ``-`` with 0), the first playable fragment of
``GET /v1/videos/{id}/content?stream=true`` (the init segment and one whole ``moof``+``mdat``: the first frame a
player can show), and the job's ``done`` event (the final MP4 is written). The decode share says how much of the
job the streamed part covers: from the first fragment to the end, against the whole.

    python bench/streaming.py                        # 128x224x17 and 480x832x81, i2v, 4 steps
    python bench/streaming.py --sizes 128x224x17 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (BenchError, emit, finish_machine, graph_path, machine, machine_line,  # noqa: E402
                          request_values, size_overrides, work_dir)
from bench.serve import free_port, serve_command, served  # noqa: E402

SIZES = ("128x224x17", "480x832x81")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("i2v", "t2v"), default="i2v", help="graphs/wan_<task>.yaml")
    parser.add_argument("--model", default="bench", help="preset or diffusers folder (default: the bench preset)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="HxWxF, comma-separated")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--preview-every", type=int, default=1, metavar="N",
                        help="ask for a denoising preview every N steps (0: none; default 1)")
    parser.add_argument("--out", type=Path, help="work folder (default: a fresh temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: {args.sizes!r} is not HxWxF[,HxWxF...]")
    if any(len(size) != 3 for size in args.sizes):
        parser.error("--sizes: each size is HxWxF")
    return args


def first_fragment_end(data: bytes) -> bool:
    """Whether ``data`` holds the init segment and one whole fragment (a ``moof`` and its ``mdat``)."""
    offset, kinds = 0, []
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        if size < 8 or offset + size > len(data):
            break
        kinds.append(data[offset + 4:offset + 8])
        offset += size
    return b"moov" in kinds and b"mdat" in kinds


async def follow_events(client, job_id: str, started: float, times: dict[str, float]) -> None:
    async with client.stream("GET", f"/v1/videos/{job_id}/events") as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
                if event == "preview":
                    times.setdefault("first_preview_s", time.monotonic() - started)
            elif line.startswith("data:") and event == "done":
                times["complete_s"] = time.monotonic() - started
                times["status"] = json.loads(line.removeprefix("data:"))["status"]
                return


async def follow_stream(client, job_id: str, started: float, times: dict[str, float]) -> None:
    data = b""
    async with client.stream("GET", f"/v1/videos/{job_id}/content", params={"stream": "true"}) as response:
        async for piece in response.aiter_bytes():
            data += piece
            if "first_fragment_s" not in times and first_fragment_end(data):
                times["first_fragment_s"] = time.monotonic() - started
    times["stream_end_s"] = time.monotonic() - started
    times["stream_bytes"] = len(data)


async def one_job(url: str, body: dict[str, Any], image: Path | None) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=None)) as client:
        started = time.monotonic()
        files = {"input_reference": (image.name, image.read_bytes(), "image/png")} if image else None
        response = await client.post("/v1/videos", data={k: str(v) for k, v in body.items()}, files=files)
        if response.status_code != 200:
            raise BenchError(f"the job was refused: HTTP {response.status_code} {response.text[:300]}")
        job_id, times = response.json()["id"], {}
        await asyncio.gather(follow_events(client, job_id, started, times),
                             follow_stream(client, job_id, started, times))
    if times.get("status") != "completed":
        raise BenchError(f"job {job_id} ended {times.get('status')}")
    return {"id": job_id, **times}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    graph = graph_path(args.task)
    out = work_dir(args.out, "streaming")
    largest = max(args.sizes, key=lambda s: s[0] * s[1] * s[2])
    overrides = [f"model.path={args.model}", *size_overrides(*largest)]
    info = machine()
    port = free_port()
    rows = []
    with served(serve_command(graph, overrides, port, out / "state", 8), port, out / "serve.log") as service:
        for height, width, frames in args.sizes:
            values = request_values(args.task, height=height, width=width, frames=frames, steps=args.steps)
            image = Path(values.pop("image")) if args.task == "i2v" else None
            values["num_inference_steps"] = values.pop("steps")
            values["preview_every"] = args.preview_every
            timed = asyncio.run(one_job(service.url, values, image))
            rows.append({"size": f"{height}x{width}x{frames}", **timed,
                         "streamed_share": (timed["complete_s"] - timed["first_fragment_s"]) / timed["complete_s"]})
    return {"benchmark": "streaming", "graph": graph.name, "model": args.model, "task": args.task, "steps": args.steps,
            "rows": rows, "machine": finish_machine(info)}


def render(result: dict[str, Any]) -> str:
    lines = [f"Streamed video: engine serve {result['graph']}, model {result['model']}, {result['steps']} steps; "
             "seconds from submission", "",
             "| size | first preview s | first playable frame s | complete file s | stream ended s "
             "| first frame early by |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        preview = f"{row['first_preview_s']:.2f}" if "first_preview_s" in row else "-"
        lines.append(f"| {row['size']} | {preview} | {row['first_fragment_s']:.2f} | {row['complete_s']:.2f} | "
                     f"{row['stream_end_s']:.2f} | {row['complete_s'] - row['first_fragment_s']:.2f} s "
                     f"({row['streamed_share']:.0%} of the job) |")
    lines += ["", machine_line(result["machine"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        emit(measure(args), args.json, render)
    except BenchError as exc:
        print(f"streaming: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
