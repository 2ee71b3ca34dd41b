"""A decoder on another host streams its video through the collector: `engine serve` with the decoding node placed on an
agent (`engine agent` on this machine, under its own name and broker user: the plan treats it as another host, so
the outputs come back over Mooncake to a ``collector`` node), a standing broker (`engine broker`, mosquitto). While
the remote decoder decodes, each chunk of frames goes over the data plane, verified, and the collector grows the
stream file that ``GET /v1/videos/{id}/content?stream=true`` serves; no network namespace needed."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.control.broker import free_port
from engine.control.standing import find_dynsec_plugin
from engine.families import get_family
from engine.stream.fmp4 import to_levels
from tests.integration.serve_helpers import REPO, Served, start_service
from tests.stream_support import decode, fragment_cuts, frames_at_each_cut, level_error

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_dynsec_plugin() is None, reason="mosquitto's dynamic security plugin is not installed"),
]

LIMITS = ("limits.height=128", "limits.width=160", "limits.num_frames=17")


def engine(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, capture_output=True, text=True,
                          check=True, **kwargs)


@pytest.fixture(scope="module")
def remote_decoder(tmp_path_factory) -> Iterator[Served]:
    """A standing broker on 127.0.0.1, an agent ``far`` on it, and `engine serve` of the one-node graph on ``far``
    (the outputs come back to the collector)."""
    folder = tmp_path_factory.mktemp("remote")
    models = get_family("wan").resolve_source("t2v", "tiny").parent.parent
    port = free_port()
    processes: list[subprocess.Popen] = []
    with (folder / "broker.log").open("w") as log:
        processes.append(subprocess.Popen([sys.executable, "-m", "engine.cli", "broker", "--listen", f"127.0.0.1:{port}",
                                           "--state-dir", str(folder / "broker"), "--kind", "mosquitto"],
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 30
        while not (folder / "broker" / "admin.password").exists():
            assert time.monotonic() < deadline, (folder / "broker.log").read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        engine("agents", "add", "far", "--state-dir", str(folder / "broker"))
        key = secrets.token_hex(32)
        url = f"mqtt://agent-far@127.0.0.1:{port}"
        with (folder / "agent.log").open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "agent", "--broker", url, "--password-file",
                 str(folder / "broker" / "agents" / "far.password"), "--name", "far", "--address", "127.0.0.1",
                 "--models", str(models), "--work-dir", str(folder / "far")],
                cwd=REPO, env={**os.environ, "ENGINE_DEPLOY_KEY": key}, stdout=log, stderr=subprocess.STDOUT))
        env = {"ENGINE_DEPLOY_KEY": key, "ENGINE_BROKER_PASSWORD_FILE": str(folder / "broker" / "admin.password"),
               "ENGINE_MOONCAKE_HOST": "127.0.0.1"}
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            served = start_service("wan_t2v_single.yaml", folder / "state", *LIMITS, f"broker=mqtt://engine@127.0.0.1:{port}",
                                   "nodes.all.place.host=far", extra=("--no-mqtt", "--save-frames"))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        served.agent_folder = folder / "far"  # type: ignore[attr-defined]
        yield served
        assert served.stop() == 0, served.log_text()[-3000:]
        assert "Traceback" not in served.log_text(), served.log_text()[-5000:]
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=15)


def test_a_remote_decoders_video_streams_through_the_collector(remote_decoder):
    served = remote_decoder
    job = httpx.post(f"{served.url}/v1/videos", timeout=60, json={
        "prompt": "decoded far away", "num_inference_steps": 2, "height": 128, "width": 160, "num_frames": 17}).json()
    pieces: list[tuple[float, bytes]] = []
    file_at_first: list[bytes] = []
    stream_file = served.state / "outputs" / f"{job['id']}.stream.mp4"

    def read() -> None:
        with httpx.stream("GET", f"{served.url}/v1/videos/{job['id']}/content", params={"stream": "true"},
                          timeout=120) as answer:
            for piece in answer.iter_bytes():
                pieces.append((time.time(), piece))
                if not file_at_first and fragment_cuts(b"".join(p for _, p in pieces)):
                    file_at_first.append(stream_file.read_bytes())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while (status := httpx.get(f"{served.url}/v1/videos/{job['id']}", timeout=30).json()["status"]) not in (
            "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    reader.join(60)
    assert status == "completed", httpx.get(f"{served.url}/v1/videos/{job['id']}", timeout=30).json()

    # The collector grew the stream from the chunks while the remote decoder decoded (its file was not ended
    # when the first fragment reached the client), and the client got all of it.
    stream = b"".join(p for _, p in pieces)
    assert file_at_first and b"mfra" not in file_at_first[0] and stream.startswith(file_at_first[0])
    assert not stream_file.exists()  # superseded by the final video once the job completed
    assert frames_at_each_cut(stream) == [1, 5, 9, 13, 17]
    outputs = served.state / "outputs"
    exact = to_levels(np.load(outputs / f"{job['id']}.npy")[0])
    assert level_error(decode(stream), decode((outputs / f"{job['id']}.mp4").read_bytes())) < 4.0
    assert level_error(decode(stream), exact) <= level_error(decode((outputs / f"{job['id']}.mp4").read_bytes()), exact) + 1.0
    collector = (served.state / "outputs" / "deploy" / "collector-0.log").read_text()
    assert f"request {job['id']}: streamed 17 frames in 5 chunks from a remote decoder" in collector, collector[-2000:]
    assert not list(Path(served.agent_folder).rglob(f"{job['id']}*.mp4")), "the decoder's host wrote a video of its own"  # type: ignore[attr-defined]
