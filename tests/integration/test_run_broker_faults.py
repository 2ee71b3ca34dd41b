"""Losing the broker is the broker's fault, never a worker's: a mosquitto restarted with a 2 s gap at each phase
of a request loses nothing, and a broker gone longer than timeouts.broker_s ends the run with "broker lost"
naming it, leaving no process behind. Real mosquitto (restarted by the test), real workers, real Mooncake."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
import yaml

from tests.integration.engine_run import GRAPHS, REPO, _wait_listening, free_port, live_workers, reference_frames

pytestmark = pytest.mark.integration

GAP_S = 2.0
#: Where each request's restart hits: the message that starts the phase (topic part, body fields).
PHASES = {
    "r1": ("encode", "/in/encoder/0", {"kind": "run_stage"}),
    "r2": ("phase1 grant", "/in/transformer/0", {"kind": "grant_request", "edge": "phase1"}),
    "r3": ("denoise", "/in/transformer/0", {"kind": "run_stage"}),
    "r4": ("phase2 grant", "/in/decoder/0", {"kind": "grant_request", "edge": "phase2"}),
    "r5": ("decode", "/in/decoder/0", {"kind": "run_stage"}),
}


class Mosquitto:
    """A mosquitto the test can kill and start again on the same port (no persistence: a restart forgets all)."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                               f"max_inflight_messages 0\nset_tcp_nodelay true\nlog_type none\n"
                               f"user {os.environ.get('USER', 'root')}\n")
        self.process: subprocess.Popen | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.process, self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=5)


def graph_with_requests(tmp_path: Path, count: int) -> Path:
    """wan_t2v.yaml with ``count`` requests (other seeds) going through one at a time (one slot per edge)."""
    graph = yaml.safe_load((GRAPHS / "wan_t2v.yaml").read_text())
    graph["requests"] = [{**graph["requests"][0], "seed": 100 + i} for i in range(count)]
    for edge in graph["edges"]:
        edge["slots"] = 1
    path = tmp_path / "wan_t2v_requests.yaml"
    path.write_text(yaml.safe_dump(graph))
    return path


async def start_run(graph: Path, out: Path, *settings: str) -> asyncio.subprocess.Process:
    command = [sys.executable, "-m", "engine.cli", "run", str(graph), "--out", str(out), "--save-frames", "--quiet"]
    for setting in settings:
        command += ["--set", setting]
    return await asyncio.create_subprocess_exec(*command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def watch_for(broker: Mosquitto, topic_part: str, match: dict, timeout_s: float = 120) -> None:
    """Return when a message of the run matching ``match`` passes the broker (as a watcher on it sees it)."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"watcher-{time.monotonic_ns()}") as client:
        await client.subscribe("dge/#", qos=1)
        async with asyncio.timeout(timeout_s):
            async for raw in client.messages:
                body = json.loads(raw.payload.partition(b"\n")[2]) if raw.payload else {}
                if topic_part in raw.topic.value and all(body.get(k) == v for k, v in match.items()):
                    return


def test_a_broker_restart_at_every_phase_loses_nothing(tmp_path):
    broker = Mosquitto(tmp_path)
    broker.start()
    out = tmp_path / "out"

    async def scenario() -> tuple[int, str, list[str]]:
        run = await start_run(graph_with_requests(tmp_path, len(PHASES)), out, f"broker={broker.url}")
        hit = []
        try:
            for request, (phase, topic_part, match) in PHASES.items():
                await watch_for(broker, topic_part, {**match, "request_id": request})
                broker.kill()
                hit.append(f"{request} {phase}")
                await asyncio.sleep(GAP_S)
                broker.start()
            output, _ = await asyncio.wait_for(run.communicate(), 180)
        finally:
            if run.returncode is None:
                run.kill()
        return run.returncode, output.decode(), hit

    try:
        code, output, hit = asyncio.run(scenario())
    finally:
        broker.kill()
    assert hit == [f"{request} {phase}" for request, (phase, _, _) in PHASES.items()]
    assert code == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["state"] for r in report["requests"]] == ["done"] * len(PHASES)
    assert report["control"]["broker_reconnects"] == len(PHASES)
    assert all(node["down"] is None for node in report["nodes"]), "a worker was blamed for the broker"
    for request in report["requests"]:
        params = json.loads((out / f"{request['id']}.json").read_text())["request"]
        expected = reference_frames("t2v", json.dumps(params, sort_keys=True))
        assert np.array_equal(np.load(out / f"{request['id']}.npy"), expected), request["id"]
    assert live_workers(out) == []


def test_a_broker_gone_longer_than_broker_s_ends_the_run_as_broker_lost(tmp_path):
    broker = Mosquitto(tmp_path)
    broker.start()
    out = tmp_path / "out"
    broker_s = 4.0

    async def scenario() -> tuple[int, str, float]:
        run = await start_run(graph_with_requests(tmp_path, 1), out, f"broker={broker.url}", f"timeouts.broker_s={broker_s}",
                              "request.steps=200")
        try:
            await watch_for(broker, "/in/transformer/0", {"kind": "run_stage"})
            await asyncio.sleep(0.5)
            broker.kill()
            killed = time.monotonic()
            output, _ = await asyncio.wait_for(run.communicate(), 60)
            return run.returncode, output.decode(), time.monotonic() - killed
        finally:
            if run.returncode is None:
                run.kill()

    code, output, seconds = asyncio.run(scenario())
    assert code == 1
    assert f"broker lost: no connection to broker 127.0.0.1:{broker.port}" in output, output[-3000:]
    assert "timeouts.broker_s" in output and "Traceback" not in output
    assert "transformer" not in output.split("broker lost")[0].splitlines()[-1]  # not blamed on a worker
    assert seconds < broker_s + 2.0, f"the run ended {seconds:.1f} s after the broker died"
    assert live_workers(out) == []
