"""The receiver's slot bookkeeping: who holds which slot, at which generation, and which are fenced.

A slot is FREE, GRANTED (a sender may write into it), OPEN (its payload verified and handed out as views)
or FENCED. Every fence bumps the slot's generation, so a manifest for the old grant no longer opens.

Why fenced slots sit out a quarantine: a Mooncake write that reported failure (or that our watchdog gave
up on) can still land later. The generation bump and the digest (bound to the request id) already stop such
a "zombie" from being accepted as another request's payload, but a zombie that lands *after* a later
payload was verified would change bytes under views a stage is reading. So a fenced slot is granted again
only once ``quarantine_s`` has passed on the receiver's clock since the fence was processed: the sender's
transfer engine gives up within its own transfer timeout, so a quarantine longer than that outlives any
write still in flight. The quarantine starts when the receiver processes the fence, so a receiver that was
itself stopped (SIGSTOP) counts it from when it runs again, when in-flight bytes land first.

A grant that is never delivered (the sender died, the fence message was lost) expires after ``lease_s``
and is fenced like a failed write.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from engine.errors import TransportError
from engine.transport.errors import SlotsExhausted


class SlotState(enum.Enum):
    FREE = "free"
    GRANTED = "granted"
    OPEN = "open"
    FENCED = "fenced"


@dataclass
class Slot:
    index: int
    generation: int = 0
    state: SlotState = SlotState.FREE
    request_id: str | None = None
    since: float = 0.0  # monotonic time of the last state change


class SlotPool:
    """Thread-safe slot state machine for one edge's receive pool (no memory: only bookkeeping)."""

    def __init__(self, edge: str, slots: int, *, quarantine_s: float, lease_s: float, clock=time.monotonic):
        if slots <= 0:
            raise ValueError(f"edge {edge!r}: a receive pool needs at least one slot, got {slots}")
        self.edge = edge
        self.quarantine_s = quarantine_s
        self.lease_s = lease_s
        self._clock = clock
        self._slots = [Slot(i) for i in range(slots)]
        self._lock = threading.Lock()

    def grant(self, request_id: str) -> Slot:
        """Take a free slot for ``request_id`` (FREE -> GRANTED); clears fenced slots whose quarantine passed."""
        with self._lock:
            now = self._clock()
            self._expire_leases(now)
            for slot in self._slots:
                if slot.state is SlotState.FENCED and now - slot.since >= self.quarantine_s:
                    slot.state = SlotState.FREE
            for slot in self._slots:
                if slot.state is SlotState.FREE:
                    self._move(slot, SlotState.GRANTED, request_id, now)
                    return Slot(slot.index, slot.generation, slot.state, request_id, now)
            fenced = [self.quarantine_s - (now - s.since) for s in self._slots if s.state is SlotState.FENCED]
            in_use = sum(s.state in (SlotState.GRANTED, SlotState.OPEN) for s in self._slots)
            retry = max(0.0, min(fenced)) if fenced else None
            detail = f"{in_use} in use, {len(fenced)} fenced"
            if retry is not None:
                detail += f" (the first clears in {retry:.1f} s)"
            raise SlotsExhausted(
                f"no free slot of {len(self._slots)}: {detail}", edge=self.edge, request_id=request_id, retry_after_s=retry
            )

    def check(self, index: int, generation: int, request_id: str) -> None:
        """Raise TransportError unless slot ``index`` is granted to ``request_id`` at ``generation``."""
        with self._lock:
            slot = self._slot(index, request_id)
            if slot.generation != generation:
                raise TransportError(
                    f"slot {index} is at generation {slot.generation}, the manifest names {generation} "
                    "(the slot was fenced after a failed write; this payload is stale)",
                    edge=self.edge, request_id=request_id,
                )
            if slot.state not in (SlotState.GRANTED, SlotState.OPEN) or slot.request_id != request_id:
                raise TransportError(
                    f"slot {index} is {slot.state.value}"
                    + (f" for request {slot.request_id}" if slot.request_id else "")
                    + ", not granted to this request",
                    edge=self.edge, request_id=request_id,
                )

    def opened(self, index: int) -> None:
        with self._lock:
            slot = self._slots[index]
            self._move(slot, SlotState.OPEN, slot.request_id, self._clock())

    def release(self, index: int, generation: int) -> None:
        """Return a granted or open slot to the pool; a release for an older generation is ignored."""
        with self._lock:
            slot = self._slot(index, None)
            if slot.generation == generation and slot.state in (SlotState.GRANTED, SlotState.OPEN):
                self._move(slot, SlotState.FREE, None, self._clock())

    def fence(self, index: int, generation: int) -> bool:
        """Fence slot ``index`` if it is still at ``generation``; returns whether it was fenced now.

        An OPEN slot is left alone: its payload verified and a stage is reading it, so the fence comes from
        a sender that lost the acknowledgement, not from a failed write; its release frees it.
        """
        with self._lock:
            slot = self._slot(index, None)
            if slot.generation != generation or slot.state in (SlotState.OPEN, SlotState.FENCED):
                return False
            self._fence(slot, self._clock())
            return True

    def state(self, index: int) -> Slot:
        """A copy of slot ``index``'s state."""
        with self._lock:
            slot = self._slot(index, None)
            return Slot(slot.index, slot.generation, slot.state, slot.request_id, slot.since)

    def _expire_leases(self, now: float) -> None:
        for slot in self._slots:
            if slot.state is SlotState.GRANTED and now - slot.since >= self.lease_s:
                self._fence(slot, now)

    def _fence(self, slot: Slot, now: float) -> None:
        slot.generation += 1
        self._move(slot, SlotState.FENCED, None, now)

    def _move(self, slot: Slot, state: SlotState, request_id: str | None, now: float) -> None:
        slot.state, slot.request_id, slot.since = state, request_id, now

    def _slot(self, index: int, request_id: str | None) -> Slot:
        if not 0 <= index < len(self._slots):
            raise TransportError(f"no slot {index}: the pool has {len(self._slots)}", edge=self.edge, request_id=request_id)
        return self._slots[index]
