"""Failures end in clear errors within seconds, never a hang: a worker killed or stopped mid-request, a broker
that cannot be reached, weights that fail to load. Real processes, real broker, real Mooncake."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from engine.families import get_family
from tests.integration.engine_run import LiveRun, engine_run, free_port, live_workers

pytestmark = pytest.mark.integration


def worker_pid(out: Path, node: str, replica: int = 0) -> int:
    spec = str(out / "deploy" / f"{node}-{replica}.json").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if spec in (entry / "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError(f"no worker process for {node}[{replica}]")


LONG_DENOISE = ("request.steps=1000",)  # a tiny model still takes seconds for 1000 steps


def test_killed_transformer_fails_the_request_within_5s_naming_it(tmp_path):
    run = LiveRun("wan_t2v.yaml", tmp_path / "out", *LONG_DENOISE)
    run.wait_for("transformer[0] denoise", timeout=240)
    time.sleep(1.0)  # well inside the denoising loop
    os.kill(worker_pid(tmp_path / "out", "transformer"), signal.SIGKILL)
    killed = time.monotonic()
    failed = run.wait_for("FAILED", timeout=10)
    assert failed - killed < 5.0, f"failure reported {failed - killed:.1f} s after the kill"
    assert run.finish() == 1
    assert "'transformer' replica 0" in run.output and "denoise" in run.output
    assert "Traceback" not in run.output
    assert live_workers(tmp_path / "out") == []


def test_stuck_transformer_is_detected_within_the_heartbeat_timeout(tmp_path):
    run = LiveRun("wan_t2v.yaml", tmp_path / "out", *LONG_DENOISE, "timeouts.heartbeat_s=2")
    run.wait_for("transformer[0] denoise", timeout=240)
    time.sleep(1.0)
    os.kill(worker_pid(tmp_path / "out", "transformer"), signal.SIGSTOP)
    stopped = time.monotonic()
    failed = run.wait_for("FAILED", timeout=15)
    assert failed - stopped < 2.0 + 2.0, f"stuck worker noticed {failed - stopped:.1f} s after it stopped"
    assert run.finish() == 1
    assert "stopped responding" in run.output and "'transformer' replica 0" in run.output
    assert live_workers(tmp_path / "out") == []


def test_request_is_retried_on_the_other_replica(tmp_path):
    run = LiveRun("wan_t2v_two_dit.yaml", tmp_path / "out", *LONG_DENOISE)
    run.wait_for("denoise ...", timeout=240)
    line = run.seen[-1]
    replica = 0 if "transformer[0]" in line else 1
    time.sleep(0.5)
    os.kill(worker_pid(tmp_path / "out", "transformer", replica), signal.SIGKILL)
    assert run.finish(timeout=240) == 0, run.output[-3000:]
    assert "retrying from the start (attempt 2)" in run.output
    assert f"transformer[{1 - replica}] done" in run.output


def test_unreachable_broker_is_a_clear_error(tmp_path):
    started = time.monotonic()
    run = engine_run("wan_t2v.yaml", tmp_path / "out", f"broker=mqtt://127.0.0.1:{free_port()}", timeout=60)
    assert run.returncode == 1
    assert time.monotonic() - started < 30
    assert "cannot reach broker" in run.stderr and "Traceback" not in run.stderr + run.stdout


def test_weights_that_fail_to_load_name_the_node(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(get_family("wan").resolve_source("t2v", "tiny"), model)
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated: not a loadable checkpoint
    run = engine_run("wan_t2v.yaml", tmp_path / "out", f"model.path={model}", timeout=240)
    assert run.returncode == 1
    assert "'transformer' replica 0" in run.stderr and "failed" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_controller_leaves_no_worker_behind(signum, tmp_path):
    # started as a script's background job is, with SIGINT ignored: `kill -INT` still stops the run
    run = LiveRun("wan_t2v.yaml", tmp_path / "out", *LONG_DENOISE, sigint_ignored=signum == signal.SIGINT)
    run.wait_for("transformer[0] denoise", timeout=240)
    assert len(live_workers(tmp_path / "out")) == 3
    run.process.send_signal(signum)
    code = run.finish(timeout=30)
    assert code == (130 if signum != signal.SIGKILL else -signal.SIGKILL), run.output[-4000:]
    deadline = time.monotonic() + 5
    while live_workers(tmp_path / "out") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_workers(tmp_path / "out") == [], run.output[-4000:]
    if signum != signal.SIGKILL:
        assert "interrupted" in run.output and "Traceback" not in run.output, run.output[-4000:]


def test_a_stopped_worker_dies_with_a_killed_controller(tmp_path):
    run = LiveRun("wan_t2v.yaml", tmp_path / "out", *LONG_DENOISE)
    run.wait_for("transformer[0] denoise", timeout=240)
    os.kill(worker_pid(tmp_path / "out", "transformer"), signal.SIGSTOP)
    run.process.kill()
    killed = time.monotonic()
    run.finish(timeout=30)
    while live_workers(tmp_path / "out") and time.monotonic() - killed < 2.0:
        time.sleep(0.05)
    assert live_workers(tmp_path / "out") == [], "a worker outlived its killed controller by 2 s"


def test_a_corrupted_transfer_is_retransmitted_and_the_output_is_unchanged(tmp_path):
    clean = engine_run("wan_t2v.yaml", tmp_path / "clean")
    faulty = engine_run("wan_t2v.yaml", tmp_path / "faulty", env={"ENGINE_TRANSPORT_FAULTS": '{"corrupt": 2, "edges": ["phase1"]}'})
    assert clean.returncode == 0 and faulty.returncode == 0, faulty.stderr[-3000:]
    log = (tmp_path / "faulty" / "deploy" / "encoder-0.log").read_text()
    assert log.count("rejected") == 2  # two deliveries failed verification, the third went through
    assert (tmp_path / "clean" / "r1.npy").read_bytes() == (tmp_path / "faulty" / "r1.npy").read_bytes()
    # The same fault on an edge declared `integrity: none` goes through unchecked. (Had only one end taken the
    # setting, the receiver would reject every delivery for carrying the wrong number of digests.)
    unchecked = engine_run("wan_t2v.yaml", tmp_path / "unchecked", "edges.0.integrity=none",
                           env={"ENGINE_TRANSPORT_FAULTS": '{"corrupt": 1, "edges": ["phase1"]}'})
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    assert "rejected" not in (tmp_path / "unchecked" / "deploy" / "encoder-0.log").read_text()


def test_a_transfer_corrupted_every_time_fails_the_request_naming_the_edge(tmp_path):
    run = engine_run("wan_t2v.yaml", tmp_path / "out", "edges.0.retries=1",
                     env={"ENGINE_TRANSPORT_FAULTS": '{"corrupt": 100, "edges": ["phase1"]}'})
    assert run.returncode == 1
    assert "edge 'phase1'" in run.stdout and "failed verification on 2 attempts" in run.stdout
    assert "Traceback" not in run.stderr


HAS_RDMA = Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir())


@pytest.mark.skipif(HAS_RDMA, reason="this host has an RDMA device, so an rdma edge starts")
def test_an_rdma_edge_without_an_rdma_device_fails_at_start_naming_the_edge(tmp_path):
    # Mooncake itself would fall back to TCP without a word; the engine refuses instead.
    run = engine_run("wan_t2v.yaml", tmp_path / "out", "edges.0.protocol=rdma")
    assert run.returncode == 1
    error = next(line for line in run.stderr.splitlines() if line.startswith("error:"))
    assert "edge 'phase1': protocol rdma, but the transfer engine finds no RDMA device on this host" in error
    assert re.match(r"error: node '(encoder|transformer)' replica 0: failed: TransportError", error), error
    assert "Traceback" not in run.stderr
    assert live_workers(tmp_path / "out") == []
