"""What every family writes beside its media file: the sidecar JSON and, on request, the exact array; the PNG
writer the image families share; and the check that keeps every output inside the run's output folder."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.stages import RequestParams

_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def output_stem(out_dir: Path, stem: str) -> str:
    """``stem`` if files named ``<stem>.<suffix>`` land directly in ``out_dir``; EngineError otherwise (a path,
    a parent reference, a hidden name: whatever a request id must not be)."""
    if not _STEM.fullmatch(stem) or (out_dir / stem).resolve().parent != out_dir.resolve():
        raise EngineError(f"refusing to write outputs named {stem!r}: not a plain file name inside {out_dir}")
    return stem


def write_sidecar(out_dir: Path, stem: str, request: RequestParams, meta: Mapping[str, Any] | None,
                  **facts: Any) -> Path:
    """``<stem>.json``: the request as validated, facts about the output, and what the runtime knows
    (graph, model, dtype, request id)."""
    path = out_dir / f"{stem}.json"
    sidecar = {"request": request.model_dump(mode="json"), **facts, **(meta or {})}
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def write_exact(out_dir: Path, stem: str, array: np.ndarray) -> Path:
    """``<stem>.npy``: the decoder's float output, for exact comparisons (media files are lossy)."""
    path = out_dir / f"{stem}.npy"
    np.save(path, array)
    return path


def write_image(request: RequestParams, outputs: Mapping[str, Any], out_dir: Path, stem: str, *,
                meta: Mapping[str, Any] | None = None, save_frames: bool = False) -> list[Path]:
    """Write ``outputs["image"]`` ([1, H, W, 3] float in [0, 1]) as ``<stem>.png`` + ``<stem>.json`` (+ ``<stem>.npy``
    with ``save_frames``, the runtime's name for "keep the raw decoder output") in ``out_dir``; return the paths.

    The PNG holds the pixels the diffusers image pipelines return with ``output_type="pil"`` (the float image
    scaled to 0..255 and rounded), converted by the same code.
    """
    from diffusers.image_processor import VaeImageProcessor  # heavy: only the decoder's worker writes images

    out_dir.mkdir(parents=True, exist_ok=True)
    image = outputs["image"].float().cpu().numpy()
    image_path = out_dir / f"{stem}.png"
    VaeImageProcessor.numpy_to_pil(image)[0].save(image_path)
    paths = [image_path, write_sidecar(out_dir, stem, request, meta, image=list(image.shape[1:]))]
    if save_frames:
        paths.append(write_exact(out_dir, stem, image[0]))
    return paths
