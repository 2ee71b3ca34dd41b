"""A graph spread over hosts: Linux network namespaces joined by a bridge, each a host with its own address and an
`engine agent`, a real mosquitto on the bridge, real Mooncake across the veths. The fixture needs root (as CI
has) and iproute2; elsewhere the tests skip with the reason.

    root namespace  10.231.0.1  `engine broker`, the controller (`engine run`) and the decoder node
    dge-h1          10.231.0.2  agent h1: the encoder node
    dge-h2          10.231.0.3  agent h2: the transformer node

The broker is a standing one, with a broker user of its own for each agent and for each of their workers per run:
the agents, started once, serve every run and a service of the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.netns import SUBNET, Cluster, namespace_hosts
from engine.families import get_family
from tests.integration.engine_run import GRAPHS, REPO, LiveRun, reference_frames
from tests.integration.serve_helpers import start_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]

HOSTS = {"h1": f"{SUBNET}.2", "h2": f"{SUBNET}.3"}
OFFERS = {"h1": "8MiB", "h2": "100KiB"}  #: cpu memory each agent offers to `place.host: any` nodes


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    wan = get_family("wan")
    models = wan.resolve_source("t2v", "tiny").parent.parent  # both built here, before any agent needs them
    assert wan.resolve_source("i2v", "tiny").is_relative_to(models)
    with namespace_hosts(tmp_path_factory.mktemp("hosts"), list(HOSTS), models, OFFERS) as made:
        assert made.hosts == HOSTS
        yield made


def engine_run(cluster: Cluster, out: Path, *settings: str, task: str = "t2v") -> subprocess.Popen:
    command = [sys.executable, "-m", "engine.cli", "run", str(GRAPHS / f"wan_{task}.yaml"), "--out", str(out), "--save-frames",
               "--quiet", "--set", f"broker={cluster.broker}", "--set", "nodes.encoder.place.host=h1",
               "--set", "nodes.transformer.place.host=h2"]
    for setting in settings:
        command += ["--set", setting]
    return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_controller_killed_mid_request_leaves_no_remote_worker_past_the_lease(cluster, tmp_path):
    run = engine_run(cluster, tmp_path / "out", "request.steps=1000", "timeouts.lease_s=5")
    deadline = time.monotonic() + 120
    while not (cluster.workers_in("h1") and cluster.workers_in("h2")):
        assert time.monotonic() < deadline and run.poll() is None, run.stdout.read() if run.poll() is not None else "no workers"
        time.sleep(0.1)
    time.sleep(8)  # loaded and denoising
    run.kill()
    killed = time.monotonic()
    while cluster.workers_in("h1") or cluster.workers_in("h2"):
        assert time.monotonic() - killed < 10, "a remote worker outlived its controller by 10 s (lease 5 s)"
        time.sleep(0.1)
    assert all(agent.poll() is None for agent in cluster.agents.values()), "an agent died with the run"


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_three_nodes_on_three_hosts_equal_the_monolithic_pipeline(cluster, tmp_path, task):
    out = tmp_path / "out"
    run = engine_run(cluster, out, task=task)
    try:
        output, _ = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError(f"the run did not end in 240 s: {run.communicate()[0][-4000:]}") from None
    assert run.returncode == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    hosts = {node["node"]: node["host"] for node in report["nodes"]}
    # The first frame is read here and reaches the encoder on h1 over the data plane (a feeder node).
    assert hosts == {"encoder": "h1", "transformer": "h2", "decoder": "local", **({"feeder": "local"} if task == "i2v" else {})}
    receives = {node["node"]: node["receives_at"] for node in report["nodes"]}
    assert receives["transformer"]["phase1"].startswith(f"{HOSTS['h2']}:")  # Mooncake peers at the hosts' addresses
    assert receives["decoder"]["phase2"].startswith(f"{SUBNET}.1:")
    params = json.loads((out / "r1.json").read_text())["request"]
    if task == "i2v":
        assert receives["encoder"]["inputs"].startswith(f"{HOSTS['h1']}:")
        assert report["requests"][0]["edges"]["inputs"]["nbytes"] == Path(params["image"]).stat().st_size
        assert not list((cluster.folder / "h1").rglob(".inputs/*")), "the copy of the image outlived the request"
    expected = reference_frames(task, json.dumps(params, sort_keys=True))
    assert np.array_equal(np.load(out / "r1.npy"), expected)
    assert not cluster.workers_in("h1") and not cluster.workers_in("h2")


def test_outputs_made_on_another_host_come_back_over_the_data_plane(cluster, tmp_path):
    out = tmp_path / "out"
    run = engine_run(cluster, out, "nodes.decoder.place.host=h1")  # the video is decoded on h1, not here
    output, _ = run.communicate(timeout=240)
    assert run.returncode == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    hosts = {node["node"]: node["host"] for node in report["nodes"]}
    assert hosts == {"encoder": "h1", "transformer": "h2", "decoder": "h1", "collector": "local"}
    receives = {node["node"]: node["receives_at"] for node in report["nodes"]}
    assert receives["collector"]["outputs"].startswith(f"{SUBNET}.1:")  # over Mooncake to this host
    (request,) = report["requests"]
    assert request["edges"]["outputs"]["nbytes"] == 9 * 48 * 64 * 3 * 4 and len(request["edges"]["outputs"]["digest"]) == 32
    params = json.loads((out / "r1.json").read_text())["request"]
    assert np.array_equal(np.load(out / "r1.npy"), reference_frames("t2v", json.dumps(params, sort_keys=True)))
    assert (out / "r1.mp4").stat().st_size > 0
    assert not list((cluster.folder / "h1").rglob("r1.*")), "the decoder's host wrote outputs of its own"


def test_engine_hosts_lists_the_live_agents_and_what_they_offer(cluster):
    listed = subprocess.run([sys.executable, "-m", "engine.cli", "hosts", "--broker", cluster.broker], cwd=REPO,
                            env=cluster.env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[2:]}
    assert {name: (row[1], row[2], row[3]) for name, row in rows.items()} == {
        host: ("online", address, "cpu") for host, address in HOSTS.items()}
    wrong = subprocess.run([sys.executable, "-m", "engine.cli", "hosts", "--broker", cluster.broker, "--wait-s", "2.5"],
                           cwd=REPO, env={**cluster.env, "ENGINE_DEPLOY_KEY": "00" * 32}, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 1 and "no agent announced itself" in wrong.stdout  # another key hears nothing


def test_a_node_placed_on_any_goes_to_the_agent_with_room_for_it_and_so_does_its_scale_out(cluster, tmp_path):
    out = tmp_path / "out"
    requests = ", ".join(f"{{prompt: request {i}, seed: {i}}}" for i in range(6))
    run = engine_run(cluster, out, "nodes.transformer.place.host=any",  # ~0.6 MiB: only h1 offers that much
                     "nodes.transformer.replicas={min: 1, max: 2}", "scaling.window_s=1", "scaling.in_window_s=2",
                     "scaling.cooldown_s=1", "scaling.out_waiting=0.5", "request.steps=12", f"requests=[{requests}]")
    output, _ = run.communicate(timeout=240)
    assert run.returncode == 0, output[-3000:]
    report = json.loads((out / "report.json").read_text())
    hosts = {(n["node"], n["replica"]): (n["host"], n["device"]) for n in report["nodes"]}
    # Six requests at once keep a segment waiting at the transformer (two run at once per replica: its edge's two
    # slots), above out_waiting: it scales out on its queue, placed like the first (h1 alone has room).
    assert hosts[("transformer", 0)] == hosts[("transformer", 1)] == ("h1", "cpu"), hosts
    assert f"run {report['run_id']}: started transformer[1]" in cluster.agent_log("h1")


def test_a_node_that_fits_no_agent_is_a_clear_error(cluster, tmp_path):
    run = engine_run(cluster, tmp_path / "out", "nodes.transformer.place.host=any",
                     "nodes.transformer.replicas=20")  # ~0.6 MiB each: more than any agent offers
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "node 'transformer' (place.host: any) needs" in output and "no agent has that free (h1 cpu 8.00 MiB, " \
        "h2 cpu 100.00 KiB)" in output, output[-3000:]
    assert "Traceback" not in output


def test_engine_plan_checks_fit_against_the_live_agents(cluster):
    def plan(*settings: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "engine.cli", "plan", str(GRAPHS / "wan_t2v.yaml"), "--broker", cluster.broker]
        for setting in ("nodes.encoder.place.host=h2", *settings):
            command += ["--set", setting]
        return subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)

    def fits(output: str) -> dict[str, list[str]]:
        rows = output.split("fit per device")[1].splitlines()[3:]
        return {row.split()[0] + " " + row.split()[1]: row.split() for row in rows if row.strip()}

    placed = plan("nodes.transformer.place.host=any")
    assert placed.returncode == 1, placed.stderr  # the encoder (~0.2 MiB) does not fit in what h2 offers
    rows = fits(placed.stdout)
    assert "transformer" in rows["h1 cpu"] and rows["h1 cpu"][-1] == "yes"  # `any` placed where `engine run` would
    assert "encoder" in rows["h2 cpu"] and rows["h2 cpu"][-1] == "NO" and "100.00 KiB" in " ".join(rows["h2 cpu"])
    assert "2 live" in placed.stdout

    gone = plan("nodes.encoder.place.host=h1", "nodes.transformer.place.host=h9")
    assert gone.returncode == 1 and "NO: agent 'h9' not live on the broker" in gone.stdout, gone.stdout[-2000:]
    assert plan("nodes.encoder.place.host=h1").returncode == 0


def runs_served(cluster: Cluster, host: str) -> set[str]:
    return set(re.findall(r"run (\S+): started", cluster.agent_log(host)))


def test_agents_started_once_stay_connected_across_the_runs_and_a_service(cluster, tmp_path, monkeypatch):
    """The module's earlier tests made three runs or more with these agents; a test run alone makes them here."""
    for missing in range(3 - min(len(runs_served(cluster, host)) for host in HOSTS)):
        output, _ = (run := engine_run(cluster, tmp_path / f"run{missing}")).communicate(timeout=240)
        assert run.returncode == 0, output[-3000:]
    for name in ("ENGINE_DEPLOY_KEY", "ENGINE_MOONCAKE_HOST", "ENGINE_BROKER_PASSWORD_FILE"):
        monkeypatch.setenv(name, cluster.env[name])
    served = start_service("wan_t2v.yaml", tmp_path / "state", f"broker={cluster.broker}", "nodes.encoder.place.host=h1",
                           "nodes.transformer.place.host=h2")
    try:
        job = httpx.post(f"{served.url}/v1/videos", json={"prompt": "a standing fleet", "seed": 5}, timeout=60).json()
        assert served.wait_for(job["id"])["status"] == "completed", served.log_text()[-3000:]
    finally:
        assert served.stop() == 0
    listed = subprocess.run([sys.executable, "-m", "engine.cli", "hosts", "--broker", cluster.broker], cwd=REPO,
                            env=cluster.env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.count(" online ") == 2, listed.stdout + listed.stderr  # between runs
    for host in HOSTS:
        log = cluster.agent_log(host)
        assert len(runs_served(cluster, host)) >= 4, log[-2000:]  # three runs and the service
        assert log.count(f"agent {host} online") == 1 and "lost broker" not in log and "replayed" not in log, log[-3000:]


def test_a_broker_restart_mid_run_with_agents_loses_nothing(cluster, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = live_run(cluster, out, monkeypatch, "request.steps=300", extra=("--save-frames",))
    run.wait_for("transformer[0] denoise", timeout=120)  # the DiT runs on h2, its inputs came from h1
    cluster.restart_broker(gap_s=2.0)
    assert run.finish(timeout=180) == 0, run.output[-3000:]
    assert "reconnect" in run.output or "broker is back" in run.output
    request = json.loads((out / "r1.json").read_text())["request"]
    assert np.array_equal(np.load(out / "r1.npy"), reference_frames("t2v", json.dumps(request, sort_keys=True)))
    assert all(agent.poll() is None for agent in cluster.agents.values()), "an agent died with the broker"


def live_run(cluster: Cluster, out: Path, monkeypatch, *settings: str, extra: tuple[str, ...] = ()) -> LiveRun:
    """`engine run` with progress lines readable as they come."""
    for name in ("ENGINE_DEPLOY_KEY", "ENGINE_MOONCAKE_HOST", "ENGINE_BROKER_PASSWORD_FILE"):
        monkeypatch.setenv(name, cluster.env[name])
    return LiveRun("wan_t2v.yaml", out, f"broker={cluster.broker}", "nodes.encoder.place.host=h1",
                   "nodes.transformer.place.host=h2", *settings, extra=extra)


def test_a_cut_link_is_noticed_within_the_heartbeat_timeout(cluster, tmp_path, monkeypatch):
    run = live_run(cluster, tmp_path / "out", monkeypatch, "request.steps=1000", "timeouts.heartbeat_s=3")
    try:
        run.wait_for("transformer[0] denoise", timeout=120)
        time.sleep(1.0)
        ip("link", "set", "veth-h2", "down")
        cut = time.monotonic()
        failed = run.wait_for("FAILED", timeout=30)
    finally:
        ip("link", "set", "veth-h2", "up")
    assert failed - cut < 3 + 2, f"the cut link was noticed after {failed - cut:.1f} s"
    assert run.finish() == 1
    assert "node 'transformer' replica 0 on host 'h2'" in run.output and "stopped responding" in run.output


def test_a_host_killed_mid_request_fails_it_within_5s_naming_host_node_replica_and_stage(cluster, tmp_path, monkeypatch):
    run = live_run(cluster, tmp_path / "out", monkeypatch, "request.steps=1000")
    run.wait_for("transformer[0] denoise", timeout=120)
    time.sleep(1.0)
    for pid in [*cluster.namespace_pids("h2"), cluster.agents["h2"].pid]:  # every process of the host
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    failed = run.wait_for("FAILED", timeout=30)
    assert failed - killed < 5, f"the dead host was noticed after {failed - killed:.1f} s"
    assert run.finish() == 1
    ended = time.monotonic()
    assert "node 'transformer' replica 0 on host 'h2' (stage 'denoise'): host 'h2' (agent 'h2') went away" \
        in run.output, run.output[-3000:]
    assert "connection lost without a goodbye" not in run.output and "not every agent reported" not in run.output
    assert ended - failed < 5, f"the run ended {ended - failed:.1f} s after failing"  # it did not wait for h2
