"""Stage backends through `engine build` and `engine run`: Qwen-Image T2I with the decoder's chain
[tensorrt, onnxruntime, eager] on this CPU machine, artifacts built ahead and only those used.

One build (the graph's size as its limits) and one run of two requests share every assertion: the decoder's one
ONNX Runtime artifact, exported with dynamic height and width, serves both requests' sizes from the cache (the
second without a rebuild), each within tolerance of the monolithic pipeline; TensorRT, not installed, is passed
over with import_error in both, and report.json says so. Then one run per other backend of the decoder
(OpenVINO and torch.compile, built on first use) and Wan I2V's decoder on ONNX Runtime (its step graphs), each
within tolerance of the monolithic pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.integration.engine_run import GRAPHS, REPO, engine_run, live_workers, qwen_reference_image, reference_frames

pytestmark = pytest.mark.integration

CHAIN = "nodes.all.backend.vae_decode=[tensorrt,onnxruntime,eager]"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backends")
    env = {"ENGINE_ARTIFACT_DIR": str(tmp / "artifacts")}
    document = yaml.safe_load((GRAPHS / "qwen_image_t2i_single.yaml").read_text())
    document["requests"] = [{"prompt": "a fox", "seed": 1}]
    built_for = tmp / "build.yaml"
    built_for.write_text(yaml.safe_dump(document))
    build = subprocess.run([sys.executable, "-m", "engine.cli", "build", str(built_for), "--set", CHAIN],
                           capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **env})
    document["requests"].append({"prompt": "a fox", "seed": 2, "height": 32, "width": 48})
    graph = tmp / "run.yaml"
    graph.write_text(yaml.safe_dump(document))
    result = engine_run(str(graph), tmp / "out", CHAIN, env={**env, "ENGINE_BACKEND_BUILD": "never"})
    return build, result


def chain(request: dict) -> list[tuple[str, str | None]]:
    return [(step["backend"], step["reason"]) for step in request["backends"]["vae_decode"]["chain"]]


def test_engine_build_builds_what_the_requests_need(run):
    build, _ = run
    assert build.returncode == 0, build.stderr[-3000:]
    assert "onnxruntime  1x16x1x2..8x2..12" in build.stdout and "built" in build.stdout  # from 16x16 to the limits
    assert "import_error" in build.stdout  # tensorrt, listed and passed over


def test_the_decoder_runs_on_onnxruntime_within_tolerance(run):
    _, result = run
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.report["requests"][0]
    use = first["backends"]["vae_decode"]
    assert chain(first) == [("tensorrt", "import_error"), ("onnxruntime", None)]
    assert use["used"] == "onnxruntime" and use["cache"] == "hit" and use["parity"]["passed"]
    assert use["shapes"] == "1x16x1x2..8x2..12"
    assert use["node"] == "all" and "onnxruntime" in use["versions"]
    params = json.loads((result.out / f"{first['id']}.json").read_text())["request"]
    image, expected = np.load(result.out / f"{first['id']}.npy"), qwen_reference_image("t2i", params)
    assert image.shape == expected.shape and np.abs(image - expected).max() <= 3e-4


def test_another_size_runs_on_the_same_artifact_without_a_rebuild(run):
    _, result = run
    second = result.report["requests"][1]
    use = second["backends"]["vae_decode"]
    assert chain(second) == [("tensorrt", "import_error"), ("onnxruntime", None)]
    assert use["cache"] == "resident" and use["build_s"] == 0 and use["shapes"] == "1x16x1x2..8x2..12"
    params = json.loads((result.out / f"{second['id']}.json").read_text())["request"]
    image, expected = np.load(result.out / f"{second['id']}.npy"), qwen_reference_image("t2i", params)
    assert image.shape == expected.shape == (32, 48, 3) and np.abs(image - expected).max() <= 3e-4
    assert live_workers(result.out) == []


def test_a_strict_node_fails_the_run_naming_stage_and_reason(tmp_path):
    result = engine_run("qwen_image_t2i_single.yaml", tmp_path / "out", "nodes.all.backend.vae_decode=[tensorrt,eager]",
                        "nodes.all.strict=true")
    assert result.returncode == 1
    assert ("StrictBackendError: stage 'vae_decode' on node 'all': backend tensorrt failed with import_error"
            in result.stderr)
    assert live_workers(result.out) == []


@pytest.fixture(scope="module", params=["openvino", "compile"])
def decoded_on(request, tmp_path_factory):
    """`engine run` of the graph's request with the decoder on ``request.param``, built on first use."""
    tmp = tmp_path_factory.mktemp(request.param)
    result = engine_run("qwen_image_t2i_single.yaml", tmp / "out", f"nodes.all.backend.vae_decode=[{request.param},eager]",
                        env={"ENGINE_ARTIFACT_DIR": str(tmp / "artifacts")})
    return request.param, result


def test_the_decoder_runs_on_each_backend_within_tolerance(decoded_on):
    backend, result = decoded_on
    assert result.returncode == 0, result.stderr[-3000:]
    (first,) = result.report["requests"]
    use = first["backends"]["vae_decode"]
    assert chain(first) == [(backend, None)] and use["asked"] == use["used"] == backend
    assert use["parity"]["passed"] and use["parity"]["max_abs"] <= 3e-4 and use["build_s"] > 0
    assert use["cache"] == ("built" if backend == "openvino" else None)  # compile keeps no artifact
    params = json.loads((result.out / f"{first['id']}.json").read_text())["request"]
    image, expected = np.load(result.out / f"{first['id']}.npy"), qwen_reference_image("t2i", params)
    assert image.shape == expected.shape and np.abs(image - expected).max() <= 3e-4
    assert live_workers(result.out) == []


def test_wan_i2v_decodes_on_onnxruntime_within_tolerance(tmp_path):
    # The graph's own request (9 frames: each of the three step graphs runs), as test_run_parity's, whose reference
    # frames a session computes once.
    result = engine_run("wan_i2v_single.yaml", tmp_path / "out", "nodes.all.backend.vae_decode=[onnxruntime,eager]",
                        env={"ENGINE_ARTIFACT_DIR": str(tmp_path / "artifacts")})
    assert result.returncode == 0, result.stderr[-3000:]
    (first,) = result.report["requests"]
    use = first["backends"]["vae_decode"]
    assert chain(first) == [("onnxruntime", None)] and use["cache"] == "built" and use["parity"]["passed"]
    request = json.loads((result.out / f"{first['id']}.json").read_text())["request"]
    frames, expected = np.load(result.out / f"{first['id']}.npy"), reference_frames("i2v", json.dumps(request, sort_keys=True))
    assert frames.shape == expected.shape and np.abs(frames - expected).max() <= 3e-4
