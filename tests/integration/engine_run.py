"""Running `engine run` for the runtime integration tests: a real mosquitto from Debian's package, the real
CLI in a subprocess, and the monolithic diffusers pipelines as the reference."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GRAPHS = REPO / "graphs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mosquitto(tmp: Path) -> Iterator[str]:
    """A mosquitto broker on a free loopback port, as a deployment would run it; yields its mqtt:// URL."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = tmp / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n"
                      f"max_queued_messages 100000\nset_tcp_nodelay true\nlog_type none\nuser {os.environ.get('USER', 'root')}\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(process, port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())


def engine_run(graph: str, out: Path, *settings: str, extra: tuple[str, ...] = (), timeout: float = 300,
               env: dict[str, str] | None = None) -> Run:
    command = [sys.executable, "-m", "engine.cli", "run", str(GRAPHS / graph), "--out", str(out), "--save-frames", *extra]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **(env or {})})
    return Run(result.returncode, result.stdout, result.stderr, out)


def live_workers(out: Path) -> list[int]:
    """Process ids of the workers of the run writing to ``out`` that are still running."""
    deploy = str(out / "deploy").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                running = (entry / "stat").read_text().split()[2] != "Z"
            except OSError:
                continue
            if any(arg in (b"engine.worker.worker", b"engine.worker.rank") for arg in cmdline) and running \
                    and any(arg.startswith(deploy) for arg in cmdline):
                found.append(int(entry.name))
    return found


@cache
def reference_frames(task: str, request_json: str, model: str = "tiny") -> np.ndarray:
    """Frames of the monolithic diffusers pipeline for a request, as the diffusers Wan examples load it
    (VAE and image encoder in float32, the rest in float32 here); ``model`` is a preset or a folder. ti2v is
    WanImageToVideoPipeline without an image encoder (expand_timesteps from the model's model_index.json)."""
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
    from PIL import Image
    from transformers import CLIPVisionModel

    from engine.families import get_family

    request = json.loads(request_json)
    source = get_family("wan").resolve_source(task, model)
    vae = AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32)
    extra = {}
    if task == "t2v":
        pipe = WanPipeline.from_pretrained(source, vae=vae, dtype=torch.float32)
    else:
        encoders = {} if task == "ti2v" else {
            "image_encoder": CLIPVisionModel.from_pretrained(source / "image_encoder", dtype=torch.float32)}
        pipe = WanImageToVideoPipeline.from_pretrained(source, vae=vae, dtype=torch.float32, **encoders)
        extra["image"] = Image.open(request["image"]).convert("RGB")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=request["prompt"], negative_prompt=request["negative_prompt"], height=request["height"],
                  width=request["width"], num_frames=request["num_frames"], num_inference_steps=request["steps"],
                  guidance_scale=request["guidance_scale"], generator=torch.Generator().manual_seed(request["seed"]),
                  **extra).frames
    return frames[0]


@cache
def qwen_pipeline(task: str, model: str = "tiny"):
    """The monolithic Qwen-Image pipeline of ``task`` in float32; ``model`` is a preset or a folder."""
    import torch
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    from engine.families import get_family
    from nodes.qwen_image.loading import load_processor

    source = get_family("qwen_image").resolve_source(task, model)
    if task == "t2i":
        pipe = QwenImagePipeline.from_pretrained(source, dtype=torch.float32)
    else:
        pipe = QwenImageEditPipeline.from_pretrained(source, processor=load_processor(source / "processor"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_reference_image(task: str, request: dict, model: str = "tiny") -> np.ndarray:
    """The image of the monolithic Qwen-Image pipeline for a request (as its sidecar JSON holds it)."""
    import torch
    from PIL import Image

    extra = {"image": Image.open(request["image"]).convert("RGB")} if task == "edit" else {}
    images = qwen_pipeline(task, model)(
        prompt=request["prompt"], negative_prompt=request["negative_prompt"], true_cfg_scale=request["true_cfg_scale"],
        height=request["height"], width=request["width"], num_inference_steps=request["steps"],
        generator=torch.Generator().manual_seed(request["seed"]), output_type="np", **extra).images
    return np.asarray(images)[0]


def _wait_listening(process: subprocess.Popen, port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the broker did not start on port {port}")
        time.sleep(0.02)


def wildcard_listeners(pids: list[int]) -> list[str]:
    """``ss -ltnp`` lines of sockets that these processes listen on, on every interface (0.0.0.0, *, [::])."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    mine = [line for line in lines if any(f"pid={pid}," in line for pid in pids)]
    assert mine, f"ss shows no listening socket of {pids}"
    return [line for line in mine if line.split()[3].rsplit(":", 1)[0] in ("0.0.0.0", "*", "[::]")]


def python_stacks(pid: int) -> str:
    """Every thread's Python stack of a process and its children (py-spy), for the report of a process that hangs."""
    if shutil.which("py-spy") is None:
        return "(py-spy is not installed: no stacks)"
    dump = subprocess.run(["py-spy", "dump", "--subprocesses", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    return f"py-spy dump of {pid}:\n{dump.stdout}{dump.stderr}"


class LiveRun:
    """`engine run` in the background, its progress lines readable as they come."""

    def __init__(self, graph: str, out: Path, *settings: str, extra: tuple[str, ...] = (), sigint_ignored: bool = False):
        """``sigint_ignored``: start it as a script's background job is started, SIGINT ignored."""
        command = [sys.executable, "-m", "engine.cli", "run", str(GRAPHS / graph), "--out", str(out), *extra]
        for setting in settings:
            command += ["--set", setting]
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=ignore)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> float:
        """Wait for a line containing ``text``; return when it came (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return time.monotonic()
        raise AssertionError(f"no line with {text!r} within {timeout} s; output so far:\n{''.join(self.seen)[-4000:]}")

    def finish(self, timeout: float = 60) -> int:
        """The exit code; an AssertionError with the output so far if the run does not end within ``timeout``."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = python_stacks(self.process.pid)
            self.process.kill()
            self.process.wait()
            time.sleep(0.2)
            while not self.lines.empty():
                self.seen.append(self.lines.get())
            raise AssertionError(f"engine run did not end within {timeout} s:\n{self.output[-5000:]}\n{stacks}") from None
        time.sleep(0.2)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)
