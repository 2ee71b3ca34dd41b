"""Wan output: an H.264 yuv420p MP4 of the frames, a sidecar JSON, and the exact frames on request."""

from __future__ import annotations

import json

import av
import numpy as np
import torch

from nodes.wan import family
from nodes.wan.family import WanRequest

REQUEST = WanRequest(prompt="a cat", height=32, width=48, num_frames=5, steps=2, seed=9, fps=8)


def frames() -> torch.Tensor:
    return torch.rand(1, 5, 32, 48, 3, generator=torch.Generator().manual_seed(0))


def test_mp4_is_h264_yuv420p_with_every_frame(tmp_path):
    paths = family.write_output(REQUEST, {"frames": frames()}, tmp_path, "req-1")

    assert [p.name for p in paths] == ["req-1.mp4", "req-1.json"]
    with av.open(str(paths[0])) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)


def test_sidecar_holds_request_and_runtime_meta(tmp_path):
    meta = {"graph": "graphs/wan_t2v.yaml", "model": "tiny", "nodes": {"transformer": "cpu"}}

    paths = family.write_output(REQUEST, {"frames": frames()}, tmp_path, "req-2", meta=meta)

    sidecar = json.loads(paths[1].read_text())
    assert sidecar["request"]["seed"] == 9 and sidecar["request"]["prompt"] == "a cat"
    assert sidecar["frames"] == [5, 32, 48, 3]
    assert sidecar["graph"] == meta["graph"] and sidecar["nodes"] == meta["nodes"]


def test_saved_frames_are_exact(tmp_path):
    video = frames()

    paths = family.write_output(REQUEST, {"frames": video}, tmp_path, "req-3", save_frames=True)

    assert paths[-1].name == "req-3.npy"
    assert np.array_equal(np.load(paths[-1]), video[0].numpy())
