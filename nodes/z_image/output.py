"""Write a finished Z-Image request: a PNG, a sidecar JSON, and optionally the raw float image.

The PNG holds the pixels ZImagePipeline returns with ``output_type="pil"`` (the float image scaled to 0..255
and rounded); ``save_frames`` (the runtime's name for "keep the raw decoder output") also writes the float
image as ``.npy`` so that two runs can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

from engine.models.outputs import write_exact, write_sidecar
from nodes.z_image.family import ZImageRequest


def write_image(
    request: ZImageRequest,
    outputs: Mapping[str, torch.Tensor],
    out_dir: Path,
    stem: str,
    *,
    meta: Mapping[str, Any] | None = None,
    save_frames: bool = False,
) -> list[Path]:
    """Write ``outputs["image"]`` ([1, H, W, 3] float in [0, 1]) as ``<stem>.png`` + ``<stem>.json``
    (+ ``<stem>.npy``) in ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = outputs["image"].float().cpu().numpy()
    image_path = out_dir / f"{stem}.png"
    VaeImageProcessor.numpy_to_pil(image)[0].save(image_path)
    paths = [image_path, write_sidecar(out_dir, stem, request, meta, image=list(image.shape[1:]))]
    if save_frames:
        paths.append(write_exact(out_dir, stem, image[0]))
    return paths
