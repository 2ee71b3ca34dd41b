"""Same-host edges through a POSIX shared-memory segment.

The receiver's pool is a file in ``/dev/shm`` that it creates, allocates up front (so a full tmpfs fails at
start-up with ENOSPC rather than with SIGBUS mid-transfer) and maps pre-faulted. The sender maps the same
segment and packs the tensors straight into the granted slot, hashing each chunk as it copies it: one pass
over the bytes, on several cores for a large payload. The
segment is a plain file rather than ``multiprocessing.shared_memory`` because Python 3.11's resource tracker
unlinks a segment when any process that merely attached to it exits.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import TransportError
from engine.transport.base import ByteReceiver, ByteSender, LandedHook, offload
from engine.transport.manifest import SlotGrant, TensorHeader, payload_nbytes
from engine.transport.payload import pack

SHM_DIR = "/dev/shm"


def _map(path: str, nbytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)


class ShmReceiver(ByteReceiver):
    transport = "shm"

    def __init__(self, edge: str, slot_bytes: int, slots: int, **options: Any):
        super().__init__(edge, slot_bytes, slots, **options)
        self._name = f"engine-{re.sub(r'[^A-Za-z0-9_.-]', '_', edge)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._path = os.path.join(SHM_DIR, self._name)
        self._size = self.slot_stride * slots
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self._size)
        except OSError as exc:
            os.close(fd)
            os.unlink(self._path)
            raise TransportError(f"cannot allocate a {self._size}-byte segment in {SHM_DIR}: {exc}", edge=edge) from exc
        os.close(fd)
        self._memory = _map(self._path, self._size)
        self._bytes = torch.frombuffer(self._memory, dtype=torch.uint8)

    @property
    def location(self) -> dict[str, Any]:
        return {"transport": "shm", "segment": self._name, "size": self._size}

    def _detach(self) -> None:
        os.unlink(self._path)


class ShmSender(ByteSender):
    """Packs into the receiver's segment directly; ``max_bytes`` bounds a payload, no staging is needed."""

    transport = "shm"

    def __init__(self, edge: str, max_bytes: int, **options: Any):
        super().__init__(edge, max_bytes, **options)
        self._segment: str | None = None
        self._memory: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def connect(self, location: dict[str, Any]) -> None:
        if location["segment"] == self._segment:
            return
        self.close()
        path = os.path.join(SHM_DIR, location["segment"])
        try:
            self._memory = _map(path, location["size"])
        except OSError as exc:
            raise TransportError(f"cannot map the receiver's segment {path}: {exc}", edge=self.edge) from exc
        self._bytes = torch.frombuffer(self._memory, dtype=torch.uint8)
        self._segment = location["segment"]

    def _slot(self, grant: SlotGrant) -> torch.Tensor:
        self.connect(grant.location)
        assert self._bytes is not None
        return self._bytes[grant.offset : grant.offset + grant.capacity]

    async def _put(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], headers: tuple[TensorHeader, ...], hashing: bool,
        on_landed: LandedHook | None,
    ) -> tuple[str, ...]:
        """Pack into the slot (hashing as it copies) in one go: the receiver has nothing to hash ahead."""
        _, digests = await offload(payload_nbytes(tensors), pack, tensors, self._slot(grant), hashing=hashing)
        return digests

    async def _poke(self, grant: SlotGrant, offset: int, value: int) -> None:
        self._slot(grant)[offset] = value

    def close(self) -> None:
        if self._memory is None:
            return
        self._bytes = None
        try:
            self._memory.close()
        except BufferError:
            pass  # a packed region is still referenced; the mapping goes with it
        self._memory = None
        self._segment = None
