"""A real ``engine serve`` for tests: its own process, port and state folder, stopped with SIGTERM as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.control.broker import BrokerAddress
from tests.integration.engine_run import free_port

REPO = Path(__file__).resolve().parents[2]
READY_S = 180.0


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    state: Path
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.state / "outputs" / "deploy").glob("*.log")))

    def wait_for(self, job_id: str, *, timeout_s: float = 240,
                 statuses: tuple[str, ...] = ("completed", "failed", "cancelled")) -> dict:
        """The job once its status is one of ``statuses``."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = httpx.get(f"{self.url}/v1/videos/{job_id}", timeout=30).json()
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout_s} s"
            time.sleep(0.1)

    def mqtt_client_settings(self) -> tuple[BrokerAddress, str, bytes, str, str]:
        """The clients' broker address, client id, key, submit topic and reply topic the service wrote."""
        settings = json.loads((self.state / "mqtt-client.json").read_text())
        address = BrokerAddress(settings["host"], settings["port"], settings["username"], settings["password"])
        return address, settings["client_id"], bytes.fromhex(settings["key"]), settings["submit_topic"], settings["reply_topic"]

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM, then the exit code (it must drain and exit on its own)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"engine serve did not stop within {timeout_s} s of SIGTERM:\n{self.log_text()[-3000:]}")


def start_service(graph: str, state: Path, *settings: str, extra: tuple[str, ...] = (), port: int | None = None) -> Served:
    """``engine serve graphs/<graph>`` on ``port`` (default: a free one), once /health answers 200."""
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = state.parent / f"{state.name}-serve-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "engine.cli", "serve", str(REPO / "graphs" / graph), "--port", str(port),
               "--state-dir", str(state), *[arg for s in settings for arg in ("--set", s)], *extra]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ})
    served = Served(process, f"http://127.0.0.1:{port}", state, log)
    deadline = time.monotonic() + READY_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"engine serve exited {process.returncode}:\n{served.log_text()[-3000:]}")
        try:
            if httpx.get(f"{served.url}/health", timeout=2).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            served.stop()
            raise AssertionError(f"engine serve not healthy after {READY_S} s:\n{served.log_text()[-3000:]}")
        time.sleep(0.3)
