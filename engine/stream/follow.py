"""Read a file that another process grows, up to its playable end, woken by the kernel as it is written.

The writer (a worker process) never waits on readers: it writes its file; each reader follows the file at its
own pace. A reader sleeps until inotify says the file changed (or whatever else it waits on sets its event, say
the job finished), with a slow timed look as a safety net where inotify is unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from engine.stream.boxes import playable_end

log = logging.getLogger("engine.stream")

LOOK_S = 1.0  #: at the latest, how often a reader looks at the file without being woken
READ_BYTES = 1 << 20  #: the most a reader hands on at once

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x8, 0x100, 0x80
_EVENT = struct.Struct("iIII")  #: struct inotify_event: wd, mask, cookie, len (then the name, len bytes)


class FileWatch:
    """Sets ``wake`` whenever a file named ``name`` in ``folder`` is created or written (Linux inotify); a no-op
    where inotify is unavailable."""

    def __init__(self, folder: Path, name: str, wake: asyncio.Event):
        self.name, self.wake = name.encode(), wake
        self._fd = -1
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_CREATE | _IN_MOVED_TO
            if libc.inotify_add_watch(fd, os.fsencode(folder), mask) < 0:
                os.close(fd)
                raise OSError(ctypes.get_errno(), "inotify_add_watch")
            self._fd = fd
            self._loop.add_reader(fd, self._on_events)
        if self._fd < 0:
            log.info("no inotify here: following %s/%s by looking every %g s", folder, name, LOOK_S)

    def _on_events(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if name == self.name:
                self.wake.set()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


async def follow_growing(path: Path, finished: Callable[[], bool], wake: asyncio.Event) -> AsyncIterator[bytes]:
    """The bytes of ``path`` up to its playable end (:mod:`engine.stream.boxes`), as the file grows; ends once
    ``finished()`` was true before a last read, or when the file is written again from the start (a request run
    again after its worker died). ``wake`` is set by the file's writes and by whoever knows when ``finished``
    changes."""
    watch = FileWatch(path.parent, path.name, wake)
    sent = scanned = 0
    file = None
    try:
        while True:
            done = finished()  # before reading: what was written before it finished is read below
            if file is None and path.is_file():
                file = open(path, "rb")  # noqa: SIM115 - held across awaits, closed in finally
            if file is not None:
                size = os.fstat(file.fileno()).st_size
                if size < sent:  # written again from the start (the request runs again): what was sent cannot be
                    log.info("%s started again: its readers' streams end", path.name)  # taken back
                    return
                scanned = await asyncio.to_thread(playable_end, file, scanned, size)
                while sent < scanned:
                    file.seek(sent)
                    data = file.read(min(READ_BYTES, scanned - sent))
                    sent += len(data)
                    yield data
            if done:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOOK_S):
                    await wake.wait()
            wake.clear()
    finally:
        watch.close()
        if file is not None:
            file.close()
