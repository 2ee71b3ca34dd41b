"""A small setup with no broker of its own: `broker: embedded@ADDRESS` listens where the agents on other hosts (a
network namespace here) reach it, with the agents' password made once and its file named for them. The same agent
serves a run and then a service (`engine serve`), each bringing up its own broker. The service's decoder runs on
the agent, as on a cluster (`engine deploy k8s`): the frames come back to the service's collector, and the agent
starts the decoder's worker again when its process is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from bench.netns import CONTROLLER, Cluster, namespace_hosts
from engine.control.broker import agents_password_file, agents_user
from engine.families import get_family
from tests.integration.engine_run import GRAPHS, REPO, reference_frames
from tests.integration.serve_helpers import start_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]

PORT = 18931
BROKER = f"broker=embedded@{CONTROLLER}:{PORT}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(state))  # where the agents' password is kept
        agents_user(CONTROLLER, PORT)  # the password's file, as the first run's output names it
        models = get_family("wan").resolve_source("t2v", "tiny").parent
        with namespace_hosts(tmp_path_factory.mktemp("hosts"), ["e1"], models,  # the agent starts before any broker
                             broker=(f"mqtt://agents@{CONTROLLER}:{PORT}", agents_password_file(CONTROLLER, PORT))) as made:
            patch.setenv("ENGINE_DEPLOY_KEY", made.key)
            patch.setenv("ENGINE_MOONCAKE_HOST", CONTROLLER)
            yield made


def test_a_run_reaches_an_agent_through_its_embedded_broker(cluster, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(GRAPHS / "wan_t2v.yaml"), "--out", str(out),
                          "--save-frames", "--quiet", "--set", BROKER, "--set", "nodes.encoder.place.host=e1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    password_file = agents_password_file(CONTROLLER, PORT)
    source = get_family("wan").resolve_source("t2v", "tiny")
    # Shown also with --quiet: complete but for the host's address, the password left in its file.
    assert (f"engine agent --broker mqtt://agents@{CONTROLLER}:{PORT} --password-file {password_file} --name e1 "
            f"--device cpu --models {source} --address <e1 address>") in run.stderr, run.stderr[-3000:]
    assert password_file.read_text().strip() not in run.stderr + run.stdout
    assert {n["node"]: n["host"] for n in json.loads((out / "report.json").read_text())["nodes"]}["encoder"] == "e1"
    request = json.loads((out / "r1.json").read_text())["request"]
    assert np.array_equal(np.load(out / "r1.npy"), reference_frames("t2v", json.dumps(request, sort_keys=True)))
    assert cluster.agents["e1"].poll() is None, "the agent did not outlive the run's broker"


def test_a_service_deploys_a_node_on_an_agent(cluster, tmp_path):
    served = start_service("wan_t2v.yaml", tmp_path / "state", BROKER, "nodes.decoder.place.host=e1",
                           extra=("--save-frames",))
    try:
        job = httpx.post(f"{served.url}/v1/videos", json={"prompt": "served across hosts", "seed": 3}, timeout=60).json()
        assert served.wait_for(job["id"])["status"] == "completed"
        outputs = served.state / "outputs"
        request = json.loads((outputs / f"{job['id']}.json").read_text())["request"]
        assert np.array_equal(np.load(outputs / f"{job['id']}.npy"),
                              reference_frames("t2v", json.dumps(request, sort_keys=True)))
        (first,) = cluster.workers_in("e1")  # the decoder's worker runs on the agent's host

        # Its process killed: the service orders the agent to start it again, and the next job runs on it.
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not ((now := cluster.workers_in("e1")) and now != [first]
                   and httpx.get(f"{served.url}/health", timeout=30).status_code == 200):
            assert time.monotonic() < deadline, f"the decoder was not started again on e1: {served.log_text()[-3000:]}"
            time.sleep(0.2)
        again = httpx.post(f"{served.url}/v1/videos", json={"prompt": "after a restart", "seed": 4}, timeout=60).json()
        assert served.wait_for(again["id"])["status"] == "completed"
        request = json.loads((outputs / f"{again['id']}.json").read_text())["request"]
        assert np.array_equal(np.load(outputs / f"{again['id']}.npy"),
                              reference_frames("t2v", json.dumps(request, sort_keys=True)))
        assert "decoder[0] is back" in served.log_text()
        assert "replayed" not in served.log_text()  # the agent's announcements after its reconnect are no replays
    finally:
        assert served.stop() == 0
    # The agent waited for the service's broker quietly: said once when it started, once when the run's went away.
    assert cluster.agent_log("e1").count("cannot reach broker") <= 3, cluster.agent_log("e1")[-3000:]
    assert not cluster.workers_in("e1"), "a remote worker outlived the service"
