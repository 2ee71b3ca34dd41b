"""Write a finished Wan request: an H.264 MP4, a sidecar JSON, and optionally the raw frames.

The MP4 (yuv420p, playable everywhere) is lossy; ``save_frames`` also writes the decoded float frames
as ``.npy`` so that two runs can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.outputs import write_exact, write_sidecar
from nodes.wan.family import WanRequest


def write_video(
    request: WanRequest,
    outputs: Mapping[str, torch.Tensor],
    out_dir: Path,
    stem: str,
    *,
    meta: Mapping[str, Any] | None = None,
    save_frames: bool = False,
) -> list[Path]:
    """Write ``outputs["frames"]`` ([1, F, H, W, 3] float in [0, 1]) as ``<stem>.mp4`` + ``<stem>.json``
    (+ ``<stem>.npy``) in ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = outputs["frames"][0].float().cpu().numpy()

    # 1. The video: frames to uint8, rounded to the nearest level.
    video_path = out_dir / f"{stem}.mp4"
    encode_mp4((frames * 255).round().astype(np.uint8), video_path, request.fps)
    paths = [video_path]

    # 2. The sidecar: the request as validated, plus what the runtime knows (graph, model, nodes).
    paths.append(write_sidecar(out_dir, stem, request, meta, frames=list(frames.shape)))

    # 3. The exact frames, on request.
    if save_frames:
        paths.append(write_exact(out_dir, stem, frames))
    return paths


def encode_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode [F, H, W, 3] uint8 RGB frames as H.264 yuv420p (even sizes required) with PyAV."""
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
