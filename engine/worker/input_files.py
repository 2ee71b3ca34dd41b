"""A request's input files as tensors, and back: how they cross to a node on another host (engine.plan.feeder).

The feeder reads each file where the request was made and sends its bytes as a uint8 tensor; the node that reads
it writes those bytes into its own run folder and runs on that copy, the request's field pointing there.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.errors import RequestError
from engine.plan.feeder import file_field


def read_input_files(request: Mapping[str, Any], limits: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The files the tensors named in ``limits`` carry, read from the paths ``request`` names; each at most its
    limit in bytes."""
    read = {}
    for name, limit in limits.items():
        field = file_field(name)
        path = Path(request[field])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RequestError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > limit:
            raise RequestError(f"{field}: {path} is {len(data)} bytes; the edge that carries input files to other "
                               f"hosts holds at most {limit}")
        read[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return read


def write_input_files(request: Mapping[str, Any], files: Mapping[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """``request`` with each field whose file came over an edge pointing at a copy of it in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    updated = dict(request)
    for name, tensor in files.items():
        field = file_field(name)
        path = folder / field  # the field's name, never one from the wire: the image's format is in its bytes
        path.write_bytes(tensor.numpy().tobytes())
        updated[field] = str(path)
    return updated


def remove_input_files(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
