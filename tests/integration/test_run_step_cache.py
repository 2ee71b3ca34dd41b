"""Step caching and previews through `engine run` (a real worker process and broker, one node): the node's cache applies
to a request that names none, a request's `cache: none` turns it off and equals the pipeline bit for bit, and
report.json counts each request's DiT passes run and skipped. The same run writes previews with `--preview DIR`: every
2 steps by the node's `preview:`, every step for the request whose `preview_every` says so (which still equals the
pipeline bit for bit), each a JPEG PIL decodes, of the size the strip of latent frames makes, within the bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from engine.preview.picture import MAX_JPEG_BYTES

from tests.integration.engine_run import GRAPHS, engine_run, live_workers, reference_frames

pytestmark = pytest.mark.integration


def test_node_cache_and_previews_and_a_request_turning_the_cache_off(tmp_path):
    document = yaml.safe_load((GRAPHS / "wan_t2v_single.yaml").read_text())
    document["nodes"]["all"]["cache"] = {"method": "fbcache", "threshold": 5.0}
    document["nodes"]["all"]["preview"] = {"every": 2}
    document["requests"] = [{"prompt": "a fox", "seed": 1},
                            {"prompt": "a fox", "seed": 1, "cache": "none", "preview_every": 1}]
    graph = tmp_path / "wan_t2v_cached.yaml"
    graph.write_text(yaml.safe_dump(document))

    run = engine_run(str(graph), tmp_path / "out", extra=("--preview", str(tmp_path / "previews")))
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]

    steps = document["request"]["steps"]
    cached, exact = (request["step_cache"]["denoise"] for request in run.report["requests"])
    # fbcache at 5: the first step of each branch runs, every later one skips its blocks past the first
    assert cached | {"seconds_saved": 0} == {"method": "fbcache", "threshold": 5.0, "passes_run": 2,
                                             "passes_skipped": 2 * (steps - 1), "seconds_saved": 0}
    assert exact == {"method": "none", "threshold": 0.0, "passes_run": 2 * steps, "passes_skipped": 0,
                     "seconds_saved": 0.0}
    assert f"denoise skipped {2 * (steps - 1)} of {2 * steps} DiT passes (fbcache 5)" in run.stderr

    request = json.loads((run.out / "r2.json").read_text())["request"]
    expected = reference_frames("t2v", json.dumps(request, sort_keys=True))
    assert np.array_equal(np.load(run.out / "r2.npy"), expected)
    assert not np.array_equal(np.load(run.out / "r1.npy"), expected)
    assert live_workers(run.out) == []

    previews = {path.name: path for path in (tmp_path / "previews").iterdir()}
    assert sorted(previews) == sorted([f"r1-denoise-step{k}.jpg" for k in (2, 4)]
                                      + [f"r2-denoise-step{k}.jpg" for k in range(1, steps + 1)])
    request = document["request"]
    latent_frames, latent_w = (request["num_frames"] - 1) // 4 + 1, request["width"] // 8
    for path in previews.values():
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.width == latent_frames * latent_w * (256 // latent_w)
        assert path.stat().st_size <= MAX_JPEG_BYTES
    assert f"2 preview(s) written: {tmp_path / 'previews' / 'r1-denoise-step2.jpg'}" in run.stderr
    assert [Path(p).name for p in run.report["requests"][0]["previews"]] == ["r1-denoise-step2.jpg", "r1-denoise-step4.jpg"]
