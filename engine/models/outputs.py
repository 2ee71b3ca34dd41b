"""What every family writes beside its media file: the sidecar JSON and, on request, the exact array; and the
check that keeps every output inside the run's output folder."""

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
