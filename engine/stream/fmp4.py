"""A fragmented MP4 that grows chunk by chunk: H.264 yuv420p like the final video, one fragment per chunk.

``movflags=frag_keyframe+empty_moov+default_base_moof``: the file starts with an empty ``moov`` (the init
segment), then one ``moof``+``mdat`` fragment per keyframe. Each chunk's first frame is forced to be an IDR
keyframe, so every fragment starts with one and the file cut after any fragment is a playable video. The encoder
runs ``tune=zerolatency`` (no B-frames, no lookahead): each frame's packet leaves the encoder at once, where the
final file's encoder (``nodes/wan/output.py``) holds up to 40 frames to plan its bits. The muxer writes a fragment
when the next one starts, so chunk k reaches the file when chunk k+1 is added (and the last at :meth:`close`).

The frames are the final file's frames encoded with other rate-control choices: decoded, they differ from the
final file's decoded frames by the compression noise of either (tests/unit/test_stream_fmp4.py states the bound).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
ENCODER_OPTIONS = {"tune": "zerolatency", "forced-idr": "1"}


def stream_path(out_dir: Path, stem: str) -> Path:
    """Where the stream of the outputs named ``stem`` grows: ``<stem>.stream.mp4`` beside them."""
    return out_dir / f"{stem}.stream.mp4"


def to_levels(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8 levels, rounded to the nearest (as the final video's)."""
    return (frames * 255).round().astype(np.uint8)


class FragmentedMp4Writer:
    """Write [f, H, W, 3] uint8 RGB chunks to ``path`` as they come; :meth:`close` ends the file (also after a
    failure: the fragments written so far stay a playable video). Opened at the first chunk (its size)."""

    def __init__(self, path: Path, fps: int):
        self.path, self.fps = path, fps
        self.frames = 0  #: frames added so far
        self.chunks = 0
        self._container: Any = None
        self._stream: Any = None

    def add(self, chunk: np.ndarray) -> None:
        import av

        if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8:
            raise ValueError(f"a chunk is [frames, height, width, 3] uint8; got {chunk.dtype} {list(chunk.shape)}")
        if self._container is None:
            self._open(*chunk.shape[1:3])
        elif (chunk.shape[1], chunk.shape[2]) != (self._stream.height, self._stream.width):
            raise ValueError(f"chunk of {chunk.shape[2]}x{chunk.shape[1]} in a {self._stream.width}x{self._stream.height} video")
        for index, pixels in enumerate(chunk):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = self.frames
            if index == 0:  # a keyframe at each chunk boundary: the fragment starts there
                frame.pict_type = av.video.frame.PictureType.I
            self._mux(self._stream.encode(frame))
            self.frames += 1
        self.chunks += 1

    def close(self) -> None:
        """Flush the encoder and write the last fragment; safe to call twice, or with nothing added."""
        if self._container is None:
            return
        container, self._container = self._container, None
        with contextlib.closing(container):
            self._mux(self._stream.encode())

    def __enter__(self) -> FragmentedMp4Writer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _open(self, height: int, width: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4", options={"movflags": MOVFLAGS},
                                  container_options={"flush_packets": "1"})
        self._stream = self._container.add_stream("libx264", rate=self.fps, options=ENCODER_OPTIONS)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self._container.mux(packet)
