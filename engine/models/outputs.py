"""What every family writes beside its media file: the sidecar JSON and, on request, the exact array."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.stages import RequestParams


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
