"""Streamed video: decoded frames leave the decoder chunk by chunk, as a fragmented MP4 that grows while the
request runs.

- :mod:`engine.stream.sink`: where a stage hands each chunk of frames it has made (a context variable; with no
  one listening the stage decodes as it always did);
- :mod:`engine.stream.fmp4`: the fragmented-MP4 writer (H.264 yuv420p, one fragment per chunk, each starting
  with a keyframe, so the file is playable at every fragment boundary);
- :mod:`engine.stream.boxes`: where a growing file is playable (the end of its last whole fragment);
- :mod:`engine.stream.follow`: reading a file another process grows, woken by the kernel (inotify) rather
  than polling;
- :mod:`engine.stream.video`: the worker that writes the outputs growing the file from its decoder's chunks;
- :mod:`engine.stream.remote`: a decoder on another host sending its chunks to the collector over the data plane.

The final output files are written as they always were; the stream is ``<stem>.stream.mp4`` beside them.
"""

from engine.stream.sink import emit, listening, stream_sink

__all__ = ["emit", "listening", "stream_sink"]
