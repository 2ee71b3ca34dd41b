"""Local worker processes: start one per node replica, watch them, stop them all (no orphans).

A worker gets its spec as a file and its secrets on standard input. The kernel kills it (SIGKILL, which also
ends a stopped process) when the controller that started it dies, however it dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import NodeError
from engine.worker.contract import WorkerSecrets, WorkerSpec
from engine.worker.threads import SPIN_COUNT

# util-linux setpriv sets PR_SET_PDEATHSIG, then execs the worker: nothing runs in the forked child but exec.
SETPRIV = shutil.which("setpriv")


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int]:
        return (self.spec.node, self.spec.replica)

    @property
    def name(self) -> str:
        return f"{self.spec.node}[{self.spec.replica}]"

    def exit_code(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            with self.log_path.open(errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip()
        except OSError:
            return ""


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class LocalLauncher:
    """Starts workers as subprocesses of this one, each in its own process group (a
    :class:`engine.controller.fleet.Launcher`)."""

    def __init__(self, deploy_dir: Path, env: dict[str, str] | None = None):
        self.deploy_dir = deploy_dir
        self.env = env or {}  #: set for every worker, over this process's environment
        self.workers: dict[tuple[str, int], WorkerProcess] = {}

    def start(self, spec: WorkerSpec, secrets: WorkerSecrets) -> WorkerProcess:
        if SETPRIV is None:
            raise NodeError("setpriv (util-linux) is not installed: without it workers could outlive the controller")
        stem = f"{spec.node}-{spec.replica}"
        spec_path = self.deploy_dir / f"{stem}.json"
        spec.write(spec_path)
        log_path = self.deploy_dir / f"{stem}.log"
        if log_path.exists():  # started again: the log of the process it replaces says why
            log_path.replace(log_path.with_suffix(".previous.log"))
        env = {**os.environ, "MC_LOG_LEVEL": os.environ.get("MC_LOG_LEVEL", "WARNING"), "PYTHONUNBUFFERED": "1",
               "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", str(SPIN_COUNT)), **self.env}
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [SETPRIV, "--pdeathsig", "KILL", sys.executable, "-m", "engine.worker.worker", str(spec_path)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        assert process.stdin is not None
        with process.stdin:
            try:
                process.stdin.write(secrets.model_dump_json().encode() + b"\n")
            except BrokenPipeError:  # it died at once: its exit code and log say why
                pass
        worker = WorkerProcess(spec, process, log_path)
        self.workers[worker.key] = worker
        return worker

    def exited(self) -> dict[tuple[str, int], str]:
        return {key: f"process {exit_description(code)}" for key, w in self.workers.items()
                if (code := w.exit_code()) is not None}

    def log_tail(self, key: tuple[str, int]) -> str:
        worker = self.workers.get(key)
        tail = worker.log_tail() if worker is not None else ""
        return f"last log lines ({worker.log_path}):\n    " + tail.replace("\n", "\n    ") if worker and tail else ""

    def kill(self, key: tuple[str, int]) -> None:
        worker = self.workers[key]
        if worker.exit_code() is None:
            _signal_group(worker.process, signal.SIGKILL)
            worker.process.wait(timeout=5)

    def stop_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every worker's process group, then SIGKILL whatever is left after ``grace_s``."""
        alive = [w for w in self.workers.values() if w.exit_code() is None]
        for worker in alive:
            _signal_group(worker.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for worker in alive:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for worker in self.workers.values():
            _signal_group(worker.process, signal.SIGKILL)  # also reaps any child left in the group
            if worker.exit_code() is None:
                worker.process.wait(timeout=5)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
