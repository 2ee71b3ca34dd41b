"""Reading fragmented MP4s in the streaming tests: decoded frames, top-level boxes, the cuts a player may get."""

from __future__ import annotations

import io

import av
import numpy as np


def decode(data: bytes) -> np.ndarray:
    """The frames of an MP4 (whole or cut), [F, H, W, 3] uint8 RGB."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def top_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of the top-level boxes."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        boxes.append((data[offset + 4:offset + 8], offset, offset + size))
        offset += size
    return boxes


def fragment_cuts(data: bytes) -> list[int]:
    """Where each fragment ends (before the next ``moof``, and the last before the trailer or the end)."""
    boxes = top_boxes(data)
    return [end for (kind, _, end), after in zip(boxes, [*boxes[1:], (b"", 0, 0)]) if kind == b"mdat"
            and after[0] != b"mdat"]


def frames_at_each_cut(data: bytes) -> list[int]:
    """How many frames a player shows of ``data`` cut after each fragment."""
    return [len(decode(data[:cut])) for cut in fragment_cuts(data)]


def level_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 videos, in levels of 255."""
    return float(np.abs(a.astype(int) - b.astype(int)).mean())
