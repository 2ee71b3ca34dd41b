"""The worker side of a streamed video: the decoder's chunks into the growing ``<stem>.stream.mp4``.

The worker that writes a request's final outputs (the decoder on the controller's host, else the collector) feeds
the chunks its decoder hands out (:mod:`engine.stream.sink`) to a :class:`~engine.stream.fmp4.FragmentedMp4Writer`
in the run's output folder. Before each chunk it checks that the request still runs: a cancelled request stops
decoding there. The file is ended when the stage ends, however it ends, so a reader always sees a whole video.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.stream.fmp4 import FragmentedMp4Writer, stream_path, to_levels
from engine.stream.sink import listening

log = logging.getLogger("engine.stream")
T = TypeVar("T")


class VideoStream:
    """One request's stream file, fed chunk by chunk; ``check`` raises when the request was dropped."""

    def __init__(self, out_dir: Path, stem: str, fps: int, check: Callable[[], None]):
        self.path = stream_path(out_dir, stem)
        self.writer = FragmentedMp4Writer(self.path, fps)
        self.check = check
        self.chunk_times: list[float] = []  #: when each chunk was written (time.time())

    def __call__(self, chunk: Any) -> None:
        """A chunk of frames ([1, f, H, W, 3] float in [0, 1], a torch tensor)."""
        self.check()
        self.writer.add(to_levels(chunk[0].float().cpu().numpy()))
        self.chunk_times.append(time.time())

    def feeding(self, compute: Callable[..., T], *args: Any) -> T:
        """``compute(*args)`` with this stream listening to the chunks its stages hand out; the file ended after."""
        with self.writer, listening(self):
            result = compute(*args)
        log.info("streamed %d frames in %d chunks to %s", self.writer.frames, self.writer.chunks, self.path.name)
        return result
