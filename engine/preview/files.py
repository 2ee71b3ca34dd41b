"""``engine run --preview DIR``: each preview as ``DIR/<request>-<stage>-step<k>.jpg``."""

from __future__ import annotations

import base64
from pathlib import Path

from engine.control.messages import Preview
from engine.errors import OutputError


def preview_path(folder: Path, preview: Preview) -> Path:
    """Where a preview goes: in ``folder`` itself (request ids and stage names are validated names, never paths)."""
    path = folder / f"{preview.request_id}-{preview.stage}-step{preview.step}.jpg"
    if path.resolve().parent != folder.resolve():
        raise OutputError(f"preview {path.name!r} would land outside {folder}")
    return path


def write_preview(folder: Path, preview: Preview) -> Path:
    """Write the preview's JPEG into ``folder`` (created if missing); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = preview_path(folder, preview)
    path.write_bytes(base64.b64decode(preview.jpeg_b64, validate=True))
    return path
