"""Where a growing fragmented MP4 can be cut and still play: after its init segment and after each whole fragment.

Top-level MP4 boxes are ``[size:u32][type:4cc]`` (``size == 1``: a u64 size follows; ``size == 0``: to the end
of the file, which a growing file never has). The playable end is the end of the last whole box that is not a
``moof`` waiting for its ``mdat``, once the ``moov`` is whole; before that it is 0.
"""

from __future__ import annotations

import struct
from typing import BinaryIO


def playable_end(file: BinaryIO, start: int, size: int) -> int:
    """The playable end of the first ``size`` bytes of ``file``, scanning whole boxes from ``start`` (0, or a
    playable end found before: the init segment is then behind)."""
    end = offset = start
    init = start > 0
    while offset + 8 <= size:
        file.seek(offset)
        header = file.read(16)
        length, kind = struct.unpack(">I4s", header[:8])
        if length == 1 and len(header) == 16:
            length = struct.unpack(">Q", header[8:16])[0]
        if length < 8 or offset + length > size:
            break  # a box still being written (or size 0: open-ended, never whole while the file grows)
        offset += length
        init = init or kind == b"moov"
        if init and kind != b"moof":
            end = offset
    return end
