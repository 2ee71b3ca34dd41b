"""A small setup with no broker of its own: `broker: embedded@ADDRESS` listens where the agents on other hosts (a
network namespace here) reach it, with the agents' password made once and printed for them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench.netns import CONTROLLER, namespace_hosts
from engine.control.broker import agents_user
from engine.families import get_family
from tests.integration.engine_run import GRAPHS, REPO, reference_frames

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]

PORT = 18931


def test_agents_reach_an_embedded_broker_listening_on_an_address(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where the agents' password is kept
    password = agents_user(CONTROLLER, PORT).password  # as a user reads it from the first run's output
    url = f"mqtt://agents:{password}@{CONTROLLER}:{PORT}"
    models = get_family("wan").resolve_source("t2v", "tiny").parent
    (tmp_path / "hosts").mkdir()
    with namespace_hosts(tmp_path / "hosts", ["e1"], models, broker=url) as cluster:  # agents start before the broker
        out = tmp_path / "out"
        run = subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", str(GRAPHS / "wan_t2v.yaml"), "--out", str(out), "--save-frames",
             "--set", f"broker=embedded@{CONTROLLER}:{PORT}", "--set", "nodes.encoder.place.host=e1"],
            cwd=REPO, env={**cluster.env, "XDG_STATE_HOME": str(tmp_path / "state")}, capture_output=True, text=True,
            timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"engine agent --broker mqtt://agents:{password}@{CONTROLLER}:{PORT} --name NAME" in run.stderr
        report = json.loads((out / "report.json").read_text())
        assert {n["node"]: n["host"] for n in report["nodes"]}["encoder"] == "e1"
        request = json.loads((out / "r1.json").read_text())["request"]
        assert np.array_equal(np.load(out / "r1.npy"), reference_frames("t2v", json.dumps(request, sort_keys=True)))
        assert cluster.agents["e1"].poll() is None, "the agent did not outlive the run's broker"
