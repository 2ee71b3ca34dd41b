"""Edges over the Mooncake transfer engine (TCP by default, RDMA by option).

One transfer engine per process, initialised in P2P-handshake mode (no metadata service); the receiver
registers its whole pool once, the sender its send buffers once (TCP reads unregistered memory too, so
CPU tensors go out from where they lie). Writes use the only non-blocking pair
the Python binding offers, ``transfer_submit_write`` + ``transfer_check_status``, polled with
``asyncio.sleep`` so the event loop never blocks, under our own watchdog (some failures take Mooncake 60 s
to report).

After our watchdog gives up on a write, Mooncake may still deliver it (a "zombie"). The sender keeps the
batch id, and the memory it reads, until Mooncake settles it; the receiver has fenced the slot by then (see
pool.py), so whatever the zombie carries, including bytes of a later payload packed into the same staging
buffer, lands only in a quarantined slot whose generation no manifest names any more.

Options (keyword arguments of make_receiver / make_sender, else the environment):
``hostname`` (``ENGINE_MOONCAKE_HOST``, default 127.0.0.1: the address peers reach this process at, and the only
one its ports listen on),
``protocol`` (``ENGINE_MOONCAKE_PROTOCOL``, ``tcp`` or ``rdma``), ``device_name``
(``ENGINE_MOONCAKE_DEVICE``, the RDMA NIC, e.g. ``mlx5_0``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import mmap
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import EdgeTimeout, PeerDead, TransportError
from engine.transport.base import PAGE, ByteReceiver, ByteSender, LandedHook, anonymous_memory, offload, page_aligned
from engine.transport.listeners import listeners, rebind, still_listening, wait_closed
from engine.transport.manifest import SlotGrant, TensorHeader, payload_nbytes
from engine.transport.payload import CHUNK_BYTES, cpu_sources, pack, source_digests

DONE, RUNNING, FAILED, TIMED_OUT = 1, 0, -1, -2
PIECE_BYTES = 8 * CHUNK_BYTES
"""Large tensors are written in pieces of this size, so the receiver can hash the first while the rest move."""
WINDOW = 2
"""Pieces in flight at once: enough to keep the connection busy, few enough that they land in order."""
POLL_MAX_S = 1e-3
"""Longest sleep between two looks at a running write (the sleeps start at 20 us and double)."""
PROBE_WAIT_S = 0.5
"""How long to wait for a probe of a peer whose write failed (a dead peer refuses in under 1 ms)."""
HANDOVER_WAIT_S = 2.0
"""How long the handshake thread may take to leave its old listening socket (its accept times out after 1 s)."""

_engines: dict[tuple[str, str, str], Any] = {}
_engines_lock = threading.Lock()


def _options(hostname: str | None, protocol: str | None, device_name: str | None) -> tuple[str, str, str]:
    protocol = protocol or os.environ.get("ENGINE_MOONCAKE_PROTOCOL", "tcp")
    if protocol not in ("tcp", "rdma"):
        raise ValueError(f"mooncake protocol must be tcp or rdma, got {protocol!r}")
    return (
        hostname or os.environ.get("ENGINE_MOONCAKE_HOST", "127.0.0.1"),
        protocol,
        device_name if device_name is not None else os.environ.get("ENGINE_MOONCAKE_DEVICE", ""),
    )


def _pieces(origins: list[int], headers: tuple[TensorHeader, ...]) -> list[tuple[int, int, int]]:
    """``(source address, start, stop)`` of the PIECE_BYTES pieces the tensors are written in.

    ``origins[i]`` is the address payload byte 0 would have if tensor i lay in a payload-shaped buffer. Each
    piece starts where one of its tensor's digest chunks starts, so a landed piece can be hashed alone.
    """
    return [
        (origin + start, start, min(start + PIECE_BYTES, h.offset + h.nbytes))
        for origin, h in zip(origins, headers)
        for start in range(h.offset, h.offset + h.nbytes, PIECE_BYTES)
    ]


def _has_rdma_device(engine: Any) -> bool:
    """Whether Mooncake's topology (``{location: [[preferred NICs], [other NICs]]}``) lists any NIC."""
    return any(nics for lists in json.loads(engine.get_local_topology()).values() for nics in lists)


def transfer_engine(hostname: str, protocol: str, device_name: str, edge: str | None = None) -> Any:
    """This process's transfer engine for ``(hostname, protocol, device_name)``, initialised once.

    Raises TransportError (naming ``edge``, the first edge that needs it) if it cannot start.
    """
    key = (hostname, protocol, device_name)
    with _engines_lock:
        if key not in _engines:
            from mooncake.engine import TransferEngine

            engine = TransferEngine()
            before = {listener.inode for listener in listeners()}
            if engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name) != 0:
                raise TransportError(
                    f"mooncake transfer engine failed to start on {hostname} over {protocol} {device_name!r}", edge=edge
                )
            _listen_on(engine, hostname, before, edge)
            if protocol == "rdma" and not _has_rdma_device(engine):  # Mooncake would quietly use TCP instead
                raise TransportError(
                    f"protocol rdma, but the transfer engine finds no RDMA device on this host"
                    f"{f' named {device_name!r}' if device_name else ''}; use protocol tcp, or check the NIC and its drivers",
                    edge=edge,
                )
            _engines[key] = engine
        return _engines[key]


def _listen_on(engine: Any, hostname: str, before: set[int], edge: str | None) -> None:
    """Move the sockets the transfer engine listens on onto ``hostname``'s address alone.

    Mooncake 0.3.13 listens on every interface whatever hostname it is given, and no setting changes that:
    ``findAvailableTcpPort`` binds its handshake (RPC) port and picks the TCP data port on INADDR_ANY
    (in6addr_any under MC_USE_IPV6), and the TCP transport's asio acceptor binds ``[::]`` dual-stack, all
    hard-coded; MC_TCP_BIND_ADDRESS only names the address advertised outside P2P-handshake mode. So each
    socket ``initialize`` opened on every interface is swapped, right after it returns and before any peer
    learns a port, for one bound to ``hostname`` (listeners.rebind).

    Mooncake's handshake thread is usually blocked in ``accept`` on its old socket then (1 s timeout), which
    keeps that socket open until the call returns. A probe to another loopback address, which only the old
    socket serves, is answered there like any probe and sends the thread on to the new socket at once; the
    wait covers a probe that misses (the accept timed out just before). Raises TransportError if ``hostname``
    is not an address of this host, or an old socket stays open.
    """
    opened = [listener for listener in listeners() if listener.inode not in before and listener.on_every_interface]
    try:
        address = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)[0][4][0]
        if not opened or ipaddress.ip_address(address).is_unspecified:
            return
        for listener in opened:
            rebind(listener, hostname)
    except OSError as exc:
        raise TransportError(
            f"the mooncake transfer engine cannot listen on {hostname} ({exc}); give it an address of this host",
            edge=edge,
        ) from exc
    handshake = next((listener for listener in opened if listener.port == engine.get_rpc_port()), None)
    if handshake is not None and still_listening({handshake.inode}):  # else accept was not waiting on it
        other = "127.0.0.2" if address == "127.0.0.1" else "127.0.0.1"
        if ":" in handshake.address:  # an IPv6 engine (MC_USE_IPV6) dials IPv6 addresses only
            other = f"[::ffff:{other}]"
        engine.send_probe(f"{other}:{handshake.port}")
    if left := wait_closed({listener.inode for listener in opened}, HANDOVER_WAIT_S):
        raise TransportError(
            f"the mooncake transfer engine still listens on every interface ({len(left)} sockets) after moving "
            f"its ports onto {hostname}",
            edge=edge,
        )


class MooncakeReceiver(ByteReceiver):
    """A receive pool in pre-faulted memory registered with the transfer engine once.

    One page past the last slot is a warm-up target: senders write there on ``connect`` to set up their
    connection before the first payload, and nothing ever reads it.
    """

    transport = "mooncake"

    def __init__(
        self, edge: str, slot_bytes: int, slots: int, *, hostname: str | None = None, protocol: str | None = None,
        device_name: str | None = None, **options: Any,
    ):
        super().__init__(edge, slot_bytes, slots, **options)
        hostname, protocol, device_name = _options(hostname, protocol, device_name)
        self._engine = transfer_engine(hostname, protocol, device_name, edge)
        self._memory = anonymous_memory(self.slot_stride * slots + PAGE)
        self._bytes = torch.frombuffer(self._memory, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()
        if self._engine.register_memory(self._base, len(self._memory)) != 0:
            raise TransportError(f"registering a {len(self._memory)}-byte receive pool failed", edge=edge)
        self._location = {
            "transport": "mooncake", "session": f"{hostname}:{self._engine.get_rpc_port()}", "base": self._base,
            "warmup_offset": self.slot_stride * slots,
        }

    @property
    def location(self) -> dict[str, Any]:
        return dict(self._location)

    def _detach(self) -> None:
        self._engine.unregister_memory(self._base)


class MooncakeSender(ByteSender):
    """Writes a payload into the receiver's slot with the transfer engine.

    Over TCP, CPU tensors are written straight from their own memory and hashed while the transfer engine
    moves them: no staging copy. Over RDMA (which reads only registered memory) and for CUDA tensors, the
    tensors are packed into a staging buffer registered once (pinned when CUDA is present), hashed chunk by
    chunk as they are copied, then written. Either way large tensors go in PIECE_BYTES pieces, WINDOW in
    flight, and the receiver hears of each piece that lands (``on_landed``) so that it hashes it while the
    rest moves. A registered scratch page serves the connection warm-up and injected corruption.
    """

    transport = "mooncake"

    def __init__(
        self, edge: str, max_bytes: int, *, hostname: str | None = None, protocol: str | None = None,
        device_name: str | None = None, **options: Any,
    ):
        super().__init__(edge, max_bytes, **options)
        hostname, protocol, device_name = _options(hostname, protocol, device_name)
        self._engine = transfer_engine(hostname, protocol, device_name, edge)
        self._registered: list[tuple[int, mmap.mmap | None]] = []  # (address, owning mmap) to unregister and free
        self._scratch = self._register(anonymous_memory(PAGE))
        self._rdma = protocol == "rdma"
        self._staging: torch.Tensor | None = None
        if torch.cuda.is_available():
            self._staging = self._register(torch.empty(page_aligned(max_bytes), dtype=torch.uint8, pin_memory=True))
        elif self._rdma:
            self._staging = self._register(anonymous_memory(page_aligned(max_bytes)))
        self._connected: set[str] = set()
        self._orphans: list[tuple[int, Any]] = []  # (batch, what it reads) given up on; kept until Mooncake settles them

    def _register(self, memory: mmap.mmap | torch.Tensor) -> torch.Tensor:
        """Register ``memory`` with the transfer engine for the sender's life; return it as uint8."""
        owner = memory if isinstance(memory, mmap.mmap) else None
        buffer = torch.frombuffer(memory, dtype=torch.uint8) if owner is not None else memory
        if self._engine.register_memory(buffer.data_ptr(), buffer.numel()) != 0:
            raise TransportError(f"registering a {buffer.numel()}-byte send buffer failed", edge=self.edge)
        self._registered.append((buffer.data_ptr(), owner))
        return buffer

    def connect(self, location: dict[str, Any]) -> None:
        """Probe the receiver and write once to its warm-up page, so the first payload skips the handshake."""
        session = location["session"]
        rc = self._probe(session)
        if rc is None:
            raise EdgeTimeout(f"receiver {session} does not answer a probe within {PROBE_WAIT_S} s", edge=self.edge)
        if rc != 0:
            raise PeerDead(f"receiver {session} refuses a probe ({rc})", edge=self.edge)
        batch = self._engine.transfer_submit_write(
            session, self._scratch.data_ptr(), location["base"] + location["warmup_offset"], 64
        )
        deadline = time.monotonic() + self.timeout_s
        while (status := self._engine.transfer_check_status(batch)) == RUNNING:
            if time.monotonic() > deadline:
                self._orphans.append((batch, None))
                raise EdgeTimeout(f"warm-up write to {session} did not finish in {self.timeout_s} s", edge=self.edge)
            time.sleep(0.0005)
        if status != DONE:
            raise TransportError(f"warm-up write to {session} failed ({status})", edge=self.edge)
        self._connected.add(session)

    async def _put(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], headers: tuple[TensorHeader, ...], hashing: bool,
        on_landed: LandedHook | None,
    ) -> tuple[str, ...]:
        nbytes = payload_nbytes(tensors)
        staged = self._rdma or any(t.device.type == "cuda" for t in tensors.values())
        if staged and self._staging is not None:  # RDMA reads registered memory only; CUDA tensors come to the host first
            _, digests = await offload(nbytes, pack, tensors, self._staging[:nbytes], hashing=hashing)
            await self._write(grant, _pieces([self._staging.data_ptr()] * len(headers), headers), None, on_landed)
            return digests
        sources = cpu_sources(tensors)  # TCP: each tensor is written from where it lies, and hashed meanwhile
        origins = [source.data_ptr() - h.offset for source, h in zip(sources, headers)]  # where payload byte 0 would be
        moving = self._write(grant, _pieces(origins, headers), sources, on_landed)
        if not hashing:
            await moving
            return ()
        digests, _ = await asyncio.gather(offload(nbytes, source_digests, sources), moving)
        return digests

    async def _poke(self, grant: SlotGrant, offset: int, value: int) -> None:
        self._scratch[0] = value
        await self._write(grant, [(self._scratch.data_ptr(), offset, offset + 1)], None, None)

    async def _write(
        self, grant: SlotGrant, pieces: list[tuple[int, int, int]], reads: Any, on_landed: LandedHook | None
    ) -> None:
        """Write ``pieces`` (source address, start and stop in the payload), WINDOW at a time, under the watchdog.

        Mooncake moves the writes it holds side by side, so pieces are submitted as earlier ones land: they
        then land in order, and ``on_landed`` hears of each while later ones still move. The watchdog fires
        when no piece lands for ``timeout_s``. ``reads`` (whatever owns the source memory) is kept alive
        until Mooncake settles every write, even one the watchdog gave up on.
        """
        where = {"edge": self.edge, "request_id": grant.request_id}
        session, base = grant.location["session"], grant.location["base"] + grant.offset
        if session not in self._connected:
            await asyncio.to_thread(self.connect, grant.location)
        self._reap()
        nbytes = sum(stop - start for _, start, stop in pieces)
        waiting = list(reversed(pieces))
        running: list[tuple[int, tuple[int, int]]] = []
        failed, progress, pause = False, time.monotonic(), 0.0
        try:
            while waiting or running:
                while waiting and len(running) < WINDOW:
                    src, start, stop = waiting.pop()
                    batch = self._engine.transfer_submit_write(session, src, base + start, stop - start)
                    if batch <= 0:
                        failed = True
                        break
                    running.append((batch, (start, stop)))
                if failed:
                    break
                statuses = [self._engine.transfer_check_status(batch) for batch, _ in running]
                if TIMED_OUT in statuses:
                    raise EdgeTimeout(f"transfer engine timed out writing slot {grant.slot} at {session}", **where)
                landed = [span for (_, span), status in zip(running, statuses) if status == DONE]
                running = [piece for piece, status in zip(running, statuses) if status == RUNNING]
                if FAILED in statuses:
                    failed = True
                    break
                if landed:
                    progress, pause = time.monotonic(), 0.0
                    if on_landed is not None and (waiting or running):
                        await on_landed(landed)
                    continue
                if time.monotonic() - progress > self.timeout_s:
                    raise EdgeTimeout(
                        f"write of {nbytes} bytes to slot {grant.slot} at {session} did not finish in {self.timeout_s} s "
                        "(receiver hung or overloaded)",
                        **where,
                    )
                await asyncio.sleep(pause)
                pause = min(max(pause * 2, 20e-6), POLL_MAX_S)
        finally:
            # given up (failed, watchdog or cancelled): Mooncake may still deliver what is running later
            self._orphans += [(batch, reads) for batch, _ in running]
        if not failed:
            return
        rc = await self._probe_async(session)
        if rc is None:
            raise EdgeTimeout(f"write to slot {grant.slot} failed and {session} does not answer a probe", **where)
        if rc != 0:
            self._connected.discard(session)
            raise PeerDead(f"write to slot {grant.slot} failed: receiver {session} is gone (probe {rc})", **where)
        raise TransportError(f"write of {nbytes} bytes to slot {grant.slot} at {session} failed; the receiver is alive", **where)

    def _reap(self) -> None:
        """Forget orphaned batches Mooncake has settled (each id is checked until its first final status only)."""
        self._orphans = [(b, reads) for b, reads in self._orphans if self._engine.transfer_check_status(b) == RUNNING]

    def _probe(self, session: str) -> int | None:
        """``send_probe`` in a daemon thread (a stopped peer can hold it for a long time); None if no answer."""
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(self._engine.send_probe(session)), daemon=True)
        thread.start()
        thread.join(PROBE_WAIT_S)
        return result[0] if result else None

    async def _probe_async(self, session: str) -> int | None:
        return await asyncio.to_thread(self._probe, session)

    def close(self) -> None:
        for address, owner in self._registered:
            self._engine.unregister_memory(address)
            if owner is not None:
                try:
                    owner.close()
                except BufferError:
                    pass  # a view of it is still referenced; the pages go with it
        self._registered = []
        self._scratch = self._staging = None
