"""Edge payloads of real 480P width through `engine run`: tensors over 8 MiB go out in pieces, the sender
hints over MQTT which pieces landed, and the receiving worker hashes them while the rest arrives."""

from __future__ import annotations

import re

import pytest

from tests.integration.engine_run import engine_run, live_workers

pytestmark = pytest.mark.integration

MIB = 1 << 20


def test_phase1_at_480p_width_is_hashed_as_it_lands(tmp_path):
    # The bench preset carries the real text width (2 x 1x512x4096 fp32 prompt embeddings: 16 MiB and more).
    run = engine_run("wan_i2v.yaml", tmp_path / "out", "model.path=bench", "request.height=32", "request.width=32",
                     "request.num_frames=5", "request.steps=1")
    assert run.returncode == 0, run.stderr[-3000:]
    edge = run.report["requests"][0]["edges"]["phase1"]
    assert edge["nbytes"] > 16 * MIB
    log = (tmp_path / "out" / "deploy" / "transformer-0.log").read_text()
    line = re.search(r"edge 'phase1' request r1: ([\d.]+) MiB verified in [\d.]+ ms \(([\d.]+) MiB of it hashed as it landed\)", log)
    assert line is not None, log[-2000:]
    total, early = float(line.group(1)), float(line.group(2))
    assert total == pytest.approx(edge["nbytes"] / MIB, abs=0.01)
    assert 8 <= early < total  # at least the first prompt embedding was hashed before the delivery came
    assert live_workers(tmp_path / "out") == []
