"""Models of other latent geometries through `engine run`, as a user with model folders of their own runs them:
a VAE of 8 latent channels and a VAE that downsamples 4x, for Qwen-Image T2I and Edit and Wan I2V, in the
three-node graphs (the denoising node holds no VAE). Wan T2V's stages are a subset of I2V's (its geometry is checked
per stage in tests/unit/test_model_geometry.py), so it has no run of its own here. `engine validate` accepts each, and each run equals the
monolithic diffusers pipeline bit for bit. A sender that delivers a payload of another shape than the plan's
fails the request at the receiver, naming the edge, the tensor, both shapes and the sending node."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.integration.engine_run import GRAPHS, REPO, engine_run, live_workers, qwen_reference_image, reference_frames
from tests.unit.geometry_support import GEOMETRIES, TASKS, build_model

pytestmark = pytest.mark.integration

GRAPH = {("qwen_image", "t2i"): "qwen_image_t2i.yaml", ("qwen_image", "edit"): "qwen_image_edit.yaml",
         ("wan", "i2v"): "wan_i2v.yaml"}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize(("family", "task"), [task for task in TASKS if task in GRAPH])
def test_a_model_of_another_geometry_runs_as_its_monolithic_pipeline(tmp_path, family, task, geometry):
    folder = build_model(family, task, geometry, tmp_path / "model")
    setting = f"model.path={folder}"
    validate = subprocess.run([shutil.which("engine") or "engine", "validate", str(GRAPHS / GRAPH[family, task]),
                               "--set", setting], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0 and f"its configs fit {family} {task}" in validate.stdout, validate.stderr

    run = engine_run(GRAPH[family, task], tmp_path / "out", setting, "request.steps=2")

    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    request = json.loads((run.out / "r1.json").read_text())["request"]
    produced = np.load(run.out / "r1.npy")
    if family == "qwen_image":
        expected = qwen_reference_image(task, request, str(folder))
    else:
        expected = reference_frames(task, json.dumps(request, sort_keys=True), str(folder))
    assert produced.shape == expected.shape and np.array_equal(produced, expected)
    assert live_workers(run.out) == []


def test_a_payload_of_another_shape_than_planned_fails_the_request_at_the_receiver(tmp_path):
    faults = json.dumps({"misshape": 1, "edges": ["phase2"]})

    run = engine_run("qwen_image_t2i.yaml", tmp_path / "out", env={"ENGINE_TRANSPORT_FAULTS": faults})

    assert run.returncode == 1
    (request,) = run.report["requests"]
    assert request["state"] == "failed" and "phase2" not in request["edges"]
    # 64x96 at 16 pixels per packed token: 24 tokens of 4 x 16 channels; the sender cut the last dimension short
    assert request["error"].startswith(
        "node 'transformer' replica 0 stage 'denoise' failed: TransportError: edge 'phase2', request r1: the receiver "
        "refused the delivery: tensor 'latents' has shape [1, 24, 63]; the plan expects [1, 24, 64] for this request")
    decoder_log = next((run.out / "deploy").glob("decoder*.log")).read_text()
    assert "delivery refused: tensor 'latents' has shape [1, 24, 63]" in decoder_log
    assert "verified" not in decoder_log  # refused before any byte was hashed
    assert not list(run.out.glob("r1.*")) and live_workers(run.out) == []
