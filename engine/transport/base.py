"""The two ends of an edge: a :class:`Receiver` owns a pool of slots, a :class:`Sender` writes into one.

The transports (``mooncake``, ``shm``, ``inproc``) differ only in where the pool's memory lives and how
the bytes get there; granting, verifying, fencing, packing, hashing and fault injection live here once.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar

import torch

from engine.errors import TransportError
from engine.transport.errors import PayloadMismatch
from engine.transport.faults import Faults
from engine.transport.manifest import Manifest, SlotGrant, TensorHeader, combine, headers_for, payload_nbytes
from engine.transport.payload import byte_view, cpu_sources, hash_ahead, source_digests, tensor_digests, unpack
from engine.transport.pool import SlotPool, SlotState

T = TypeVar("T")
PAGE = mmap.PAGESIZE
INLINE_BYTES = 1 << 20
"""Payloads up to this size are packed and hashed on the event loop; larger ones in a worker thread."""
INTEGRITY = ("xxh3-128", "none")
LandedHook = Callable[[Sequence[tuple[int, int]]], Awaitable[None]]
"""Told the payload ranges that have landed in the slot while other bytes are still moving."""


def page_aligned(n: int) -> int:
    return -(-n // PAGE) * PAGE


def default_quarantine_s() -> float:
    """Longer than the transfer engine's own timeout (``MC_TRANSFER_TIMEOUT``, default 30 s) plus a margin."""
    return float(os.environ.get("MC_TRANSFER_TIMEOUT", "30")) + 5.0


def anonymous_memory(nbytes: int) -> mmap.mmap:
    """Private anonymous memory with every page faulted in now (first touch runs at under 1 GB/s)."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def verify(
    payload: torch.Tensor, manifest: Manifest, integrity: str, known: Mapping[tuple[int, int], Future[bytes]] | None = None
) -> None:
    """Raise PayloadMismatch (naming the edge, request and tensors) unless ``payload`` matches ``manifest``.

    With integrity ``none`` the bytes are not hashed, but the manifest must still bind edge, request and headers.
    ``known``: chunk digests already being computed (see ByteReceiver.landed).
    """
    where = {"edge": manifest.edge, "request_id": manifest.request_id, "tensors": ()}
    hashing = integrity != "none"
    if len(manifest.tensor_digests) != (len(manifest.tensors) if hashing else 0):
        raise PayloadMismatch(f"manifest carries {len(manifest.tensor_digests)} digests for {len(manifest.tensors)} "
                              f"tensors on an edge with integrity {integrity}", **where)
    for header in manifest.tensors:
        if header.offset + header.nbytes > manifest.nbytes:
            raise PayloadMismatch(
                f"tensor {header.name!r} lies outside the {manifest.nbytes}-byte payload", **{**where, "tensors": (header.name,)}
            )
    actual = tensor_digests(payload, manifest.tensors, known) if hashing else ()
    if combine(manifest.edge, manifest.request_id, manifest.tensors, actual) == manifest.digest:
        return
    bad = [h.name for h, want, got in zip(manifest.tensors, manifest.tensor_digests, actual) if want != got]
    if bad:
        raise PayloadMismatch(f"digest mismatch in tensor(s) {', '.join(repr(n) for n in bad)}", **{**where, "tensors": bad})
    raise PayloadMismatch("manifest digest mismatch: the headers, edge or request id were altered", **where)


def _check_integrity(edge: str, integrity: str) -> str:
    if integrity not in INTEGRITY:
        raise ValueError(f"edge {edge!r}: integrity must be one of {', '.join(INTEGRITY)}, got {integrity!r}")
    return integrity


class Receiver(ABC):
    """Owns one edge's receive pool: grants slots, verifies payloads, hands out views, fences slots."""

    transport: ClassVar[str]

    def __init__(
        self, edge: str, slot_bytes: int, slots: int, *, quarantine_s: float | None = None, lease_s: float = 60.0,
        integrity: str = "xxh3-128",
    ):
        if slot_bytes <= 0:
            raise ValueError(f"edge {edge!r}: slot_bytes must be positive, got {slot_bytes}")
        self.edge = edge
        self.integrity = _check_integrity(edge, integrity)
        self.slot_bytes = slot_bytes
        self.slot_stride = page_aligned(slot_bytes)
        self.pool = SlotPool(
            edge, slots, quarantine_s=default_quarantine_s() if quarantine_s is None else quarantine_s, lease_s=lease_s
        )

    @property
    @abstractmethod
    def location(self) -> dict[str, Any]:
        """What a sender needs to reach this pool (JSON)."""

    def grant(self, request_id: str, nbytes: int) -> SlotGrant:
        """Grant a slot for a payload of ``nbytes``.

        Raises TransportError if ``nbytes`` exceeds the slot size, SlotsExhausted if no slot is free.
        """
        if nbytes > self.slot_bytes:
            raise TransportError(
                f"payload of {nbytes} bytes exceeds the slot size of {self.slot_bytes} bytes "
                "(the plan sized this edge for smaller tensors)",
                edge=self.edge, request_id=request_id,
            )
        slot = self.pool.grant(request_id)
        return SlotGrant(
            edge=self.edge, request_id=request_id, slot=slot.index, generation=slot.generation,
            offset=slot.index * self.slot_stride, capacity=self.slot_bytes, location=self.location,
        )

    def landed(self, slot: int, generation: int, request_id: str, ranges: Sequence[tuple[int, int]]) -> None:
        """A hint that ``ranges`` of a granted slot hold their final bytes while the rest is still moving.

        Receivers that hash start on them now, so that verification at delivery has only the last bytes
        left to hash. A wrong hint can only make verification fail (and the sender retransmit).
        """

    def hashed_ahead(self, slot: int, generation: int) -> int:
        """Bytes of slot ``slot`` (at ``generation``) being hashed ahead of delivery on landed hints."""
        return 0

    @abstractmethod
    def open(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Verify the slot's payload against ``manifest`` and return zero-copy views of its tensors.

        Raises IntegrityError on a mismatch (the slot stays granted, so the sender can retransmit) and
        TransportError for a manifest that does not name this edge or a live grant.
        """

    def release(self, held: SlotGrant | Manifest | int) -> None:
        """Return a slot to the pool once its views are no longer used."""
        if isinstance(held, int):
            self.pool.release(held, self.pool.state(held).generation)
        else:
            self.pool.release(held.slot, held.generation)

    def discard(self, manifest: Manifest) -> None:
        """Give back the slot of a delivery refused unopened, if that slot is still granted to its request
        (and not opened: then views of it are in use)."""
        try:
            self.pool.check(manifest.slot, manifest.generation, manifest.request_id)
        except TransportError:
            return  # fenced, expired or another request's since: not this delivery's to give back
        if self.pool.state(manifest.slot).state is SlotState.GRANTED:
            self.release(manifest)

    def fence(self, held: SlotGrant | Manifest | int) -> bool:
        """Fence a slot after a failed write: bump its generation and quarantine it.

        A grant or manifest of an older generation is ignored (already fenced); returns whether it fenced.
        """
        if isinstance(held, int):
            return self.pool.fence(held, self.pool.state(held).generation)
        return self.pool.fence(held.slot, held.generation)

    @abstractmethod
    def close(self) -> None:
        """Free the pool (views handed out keep their memory alive until they are dropped)."""

    def _check(self, manifest: Manifest) -> None:
        if manifest.edge != self.edge:
            raise TransportError(f"manifest for edge {manifest.edge!r} delivered here", edge=self.edge, request_id=manifest.request_id)
        self.pool.check(manifest.slot, manifest.generation, manifest.request_id)


class ByteReceiver(Receiver):
    """A receiver whose pool is memory the sender writes bytes into (mooncake, shm).

    Subclasses map the pool as ``_memory`` (an mmap) with ``_bytes`` a uint8 tensor over it, and say in
    ``_detach`` how peers stop reaching it (unregister it, unlink its name) before it is unmapped.
    """

    _memory: mmap.mmap | None
    _bytes: torch.Tensor | None
    _ahead: dict[int, tuple[int, dict[tuple[int, int], Future[bytes]]]]  # slot -> (generation, chunk digests)

    def __init__(self, edge: str, slot_bytes: int, slots: int, **options: Any):
        super().__init__(edge, slot_bytes, slots, **options)
        self._ahead = {}
        self._ahead_lock = threading.Lock()  # hints arrive on the event loop, deliveries open in a worker thread

    @abstractmethod
    def _detach(self) -> None:
        """Make the pool unreachable to senders; called once by ``close`` before the memory is released."""

    def _slot_bytes(self, slot: int) -> torch.Tensor:
        """The uint8 tensor over slot ``slot``'s memory."""
        assert self._bytes is not None
        start = slot * self.slot_stride
        return self._bytes[start : start + self.slot_bytes]

    def close(self) -> None:
        if self._memory is None:
            return
        self._detach()
        self._bytes = None
        try:
            self._memory.close()
        except BufferError:
            pass  # views handed out by open() still export the pages; they are freed with the last view
        self._memory = None

    def grant(self, request_id: str, nbytes: int) -> SlotGrant:
        grant = super().grant(request_id, nbytes)
        with self._ahead_lock:
            self._ahead.pop(grant.slot, None)
        return grant

    def landed(self, slot: int, generation: int, request_id: str, ranges: Sequence[tuple[int, int]]) -> None:
        if self.integrity == "none" or self._bytes is None:
            return
        try:
            self.pool.check(slot, generation, request_id)
        except TransportError:
            return  # a late hint for a slot fenced, released or granted anew
        if self.pool.state(slot).state is not SlotState.GRANTED:
            return  # already opened: nothing left to verify
        ranges = [(start, stop) for start, stop in ranges if 0 <= start < stop <= self.slot_bytes]
        started = hash_ahead(byte_view(self._slot_bytes(slot)), ranges)
        with self._ahead_lock:
            then, ahead = self._ahead.get(slot, (generation, {}))
            self._ahead[slot] = (generation, (ahead if then == generation else {}) | started)

    def hashed_ahead(self, slot: int, generation: int) -> int:
        with self._ahead_lock:
            then, ahead = self._ahead.get(slot, (generation, {}))
        return sum(stop - start for start, stop in ahead) if then == generation else 0

    def open(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        self._check(manifest)
        if manifest.nbytes > self.slot_bytes:
            raise PayloadMismatch(
                f"manifest claims {manifest.nbytes} bytes, the slot holds {self.slot_bytes}",
                edge=self.edge, request_id=manifest.request_id, tensors=(),
            )
        payload = self._slot_bytes(manifest.slot)[: manifest.nbytes]
        with self._ahead_lock:
            generation, ahead = self._ahead.pop(manifest.slot, (manifest.generation, {}))
        verify(payload, manifest, self.integrity, ahead if generation == manifest.generation else None)
        self.pool.opened(manifest.slot)
        return unpack(payload, manifest)


class Sender(ABC):
    """Writes one request's tensors into a slot a receiver granted, and describes them in a manifest."""

    transport: ClassVar[str]

    def __init__(
        self, edge: str, max_bytes: int, *, timeout_s: float = 10.0, faults: Faults | None = None,
        integrity: str = "xxh3-128",
    ):
        if max_bytes <= 0:
            raise ValueError(f"edge {edge!r}: max_bytes must be positive, got {max_bytes}")
        self.edge = edge
        self.integrity = _check_integrity(edge, integrity)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.faults = faults if faults is not None else Faults.from_env(edge)
        self._lock = asyncio.Lock()

    @abstractmethod
    def connect(self, location: dict[str, Any]) -> None:
        """Reach the receiver at ``location`` ahead of the first write (handshake, probe)."""

    @abstractmethod
    def close(self) -> None:
        """Release the staging memory and connections."""

    @abstractmethod
    async def write(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], request_id: str, on_landed: LandedHook | None = None
    ) -> Manifest:
        """Put ``tensors`` into the granted slot and return the manifest to deliver.

        A sender that moves a payload in pieces tells ``on_landed`` which ranges have landed while the rest
        is still moving (for the receiver to hash ahead). Raises PeerDead or EdgeTimeout (naming edge and
        request) when the bytes could not be written; the caller must then fence the slot.
        """

    def _check_grant(self, grant: SlotGrant, request_id: str) -> None:
        if grant.edge != self.edge or grant.request_id != request_id:
            raise TransportError(
                f"grant is for edge {grant.edge!r} request {grant.request_id}", edge=self.edge, request_id=request_id
            )


class ByteSender(Sender):
    """A sender that moves bytes into the receiver's slot (mooncake, shm); subclasses say how they get there."""

    @abstractmethod
    async def _put(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], headers: tuple[TensorHeader, ...], hashing: bool,
        on_landed: LandedHook | None,
    ) -> tuple[str, ...]:
        """Move the tensors' bytes into the granted slot at the headers' offsets; return their digests (or ()).

        Raises PeerDead or EdgeTimeout (naming edge and request) when the bytes could not be written.
        """

    @abstractmethod
    async def _poke(self, grant: SlotGrant, offset: int, value: int) -> None:
        """Overwrite the byte at payload ``offset`` in the granted slot (injected corruption in transit)."""

    async def write(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], request_id: str, on_landed: LandedHook | None = None
    ) -> Manifest:
        """Move ``tensors`` into the granted slot, hashing them on the way; return the manifest to deliver.

        No landed ranges are reported without integrity (nothing hashes them), nor for a write that will get
        an injected corruption (it is flipped after the bytes land, so the receiver would hash it too early).
        """
        where = {"edge": self.edge, "request_id": request_id}
        self._check_grant(grant, request_id)
        tensors = self.faults.take_misshape(tensors)
        nbytes = payload_nbytes(tensors)
        if nbytes > min(grant.capacity, self.max_bytes):
            raise TransportError(
                f"payload of {nbytes} bytes exceeds the slot ({grant.capacity}) or sender ({self.max_bytes}) size",
                **where,
            )
        headers = headers_for(tensors)
        hashing = self.integrity != "none"
        async with self._lock:
            delay = self.faults.take_delay()
            if delay:
                await asyncio.sleep(delay)
            if self.faults.take_drop():  # the bytes never move; the manifest describes them as they should be
                digests = await offload(nbytes, source_digests, cpu_sources(tensors)) if hashing else ()
            else:
                hints = on_landed if hashing and not self.faults.plan.corrupt else None
                digests = await self._put(grant, tensors, headers, hashing, hints)
                flip = self.faults.take_corruption(headers)
                if flip is not None:
                    await self._poke(grant, flip[0], _byte_at(tensors, headers, flip[0]) ^ (1 << flip[1]))
        return Manifest(
            edge=self.edge, request_id=request_id, slot=grant.slot, generation=grant.generation, nbytes=nbytes,
            tensors=headers, tensor_digests=digests, digest=combine(self.edge, request_id, headers, digests),
        )


def _byte_at(tensors: Mapping[str, torch.Tensor], headers: tuple[TensorHeader, ...], offset: int) -> int:
    """The value of the payload byte at ``offset`` (which lies in a tensor, not in a gap)."""
    for header, tensor in zip(headers, tensors.values()):
        if header.offset <= offset < header.offset + header.nbytes:
            return int(tensor.detach().reshape(-1).view(torch.uint8)[offset - header.offset])
    raise ValueError(f"payload byte {offset} lies in no tensor")


async def offload(nbytes: int, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a copy or hash over ``nbytes`` inline when small, else in a worker thread (both release the GIL)."""
    if nbytes > INLINE_BYTES:
        return await asyncio.to_thread(function, *args, **kwargs)
    return function(*args, **kwargs)
