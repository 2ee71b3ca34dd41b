"""Edges over real Mooncake TCP between real processes: integrity, dead and hung peers, fencing, zombies."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import torch

os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

from transport_helpers import PipeLink, freeze, start_receiver, tensor_sha256  # noqa: E402

from engine.errors import EdgeTimeout, PeerDead  # noqa: E402
from engine.transport import Manifest, SlotsExhausted, make_sender, send_tensors  # noqa: E402
from engine.transport.faults import Faults  # noqa: E402
from engine.transport.manifest import DTYPES, combine  # noqa: E402
from engine.transport.payload import pack  # noqa: E402

pytestmark = pytest.mark.integration

EDGE = "phase1"
SLOT_BYTES = 1 << 20


def random_payload(rng: random.Random) -> dict[str, torch.Tensor]:
    """1-4 tensors of random dtypes (bf16 always among the choices) and shapes, with random bytes."""
    tensors = {}
    for i in range(rng.randint(1, 4)):
        dtype = DTYPES[rng.choice(["bfloat16", "bfloat16", "float32", "float16", "int64", "int8", "bool", "uint8"])]
        shape = tuple(rng.randint(1, 24) for _ in range(rng.randint(0, 3)))
        element = torch.empty(0, dtype=dtype).element_size()
        raw = torch.frombuffer(bytearray(rng.randbytes(max(1, int(torch.Size(shape).numel())) * element)), dtype=torch.uint8)
        if dtype == torch.bool:
            raw &= 1
        tensors[f"t{i}"] = raw.view(dtype).reshape(shape)
    return tensors


def mooncake_edge(slot_bytes: int, slots: int, **options):
    """A receiver process with a Mooncake pool, a sender here connected to it, and the link between them."""
    process = start_receiver("mooncake", EDGE, slot_bytes, slots, **options)
    sender = make_sender("mooncake", EDGE, slot_bytes, faults=Faults(), timeout_s=10.0)
    sender.connect(process.location)
    return process, sender, PipeLink(EDGE, process.conn)


@pytest.fixture(scope="module")
def receiver():
    process = start_receiver("mooncake", EDGE, SLOT_BYTES, 2, quarantine_s=1.0)
    yield process
    process.stop()


def test_200_random_payloads_with_a_flipped_bit_each_are_caught_and_retransmitted(receiver):
    sender = make_sender("mooncake", EDGE, SLOT_BYTES, faults=Faults(), timeout_s=5.0)
    sender.connect(receiver.location)
    link = PipeLink(EDGE, receiver.conn)
    rng = random.Random(4)

    async def run() -> None:
        for i in range(200):
            tensors = random_payload(rng)
            sender.faults.arm(corrupt=1)
            manifest = await send_tensors(sender, link, tensors, f"req-{i}", retries=2)
            nack, ack = link.acks[-2:]
            assert not nack.ok and len(nack.tensors) == 1 and nack.tensors[0] in tensors, nack
            assert ack.ok
            assert link.received[f"req-{i}"] == {name: tensor_sha256(t) for name, t in tensors.items()}
            link.release(manifest)

    asyncio.run(run())
    assert len(sender.faults.injected) == 200 and all(f.startswith("corrupt@") for f in sender.faults.injected)
    assert len(link.acks) == 400
    sender.close()


def test_large_writes_keep_the_event_loop_responsive():
    """A 64 MiB write takes 50-200 ms here; done on the loop it would show as a gap that long."""
    nbytes = 64 << 20
    process, sender, link = mooncake_edge(nbytes, 2, quarantine_s=1.0)
    tensors = {"latents": torch.randn(nbytes // 4)}
    gaps: list[float] = []

    async def run() -> None:
        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        for i in range(3):
            link.release(await send_tensors(sender, link, tensors, f"big-{i}"))
        task.cancel()

    try:
        asyncio.run(run())
    finally:
        process.stop()
        sender.close()
    assert link.received["big-2"] == {"latents": tensor_sha256(tensors["latents"])}
    assert max(gaps) < 0.1, f"event loop stalled for {max(gaps) * 1000:.0f} ms"


def test_large_payload_moves_in_pieces_the_receiver_hashes_as_they_land():
    """Tensors over 8 MiB go out in 8 MiB pieces; the receiver hears of landed pieces and hashes them early."""
    nbytes = 56 << 20
    process, sender, link = mooncake_edge(nbytes, 1, quarantine_s=1.0)
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "mask": torch.ones(3, 5, dtype=torch.bool),
        "latents": torch.randn(20 << 20, generator=gen).to(torch.bfloat16),  # 40 MiB: 5 pieces
        "embeds": torch.randn(3 << 20, generator=gen).reshape(3, -1),  # 12 MiB: 2 pieces
    }

    async def run() -> tuple[Manifest, list]:
        manifest = await send_tensors(sender, link, tensors, "big")
        return manifest, await link.hinted()

    try:
        manifest, hinted = asyncio.run(run())
    finally:
        process.stop()
        sender.close()
    assert link.received["big"] == {name: tensor_sha256(t) for name, t in tensors.items()}
    assert [a.ok for a in link.acks] == [True]
    headers = {h.name: h for h in manifest.tensors}
    piece_starts = {h.offset + k * (8 << 20) for h in headers.values() for k in range(-(-h.nbytes // (8 << 20)))}
    ranges = [tuple(r) for hint in hinted for r in hint]
    assert ranges, "no piece was reported landed before the last"
    assert all(start in piece_starts and stop - start <= 8 << 20 for start, stop in ranges)
    assert len(ranges) < len(piece_starts)  # the last pieces land with the delivery, not as a hint


def test_dead_peer_is_reported_within_2_s():
    process, sender, link = mooncake_edge(16 << 20, 1)
    tensors = {"latents": torch.ones(4 << 20)}

    async def run() -> float:
        grant = await link.request_grant("req-dead", 16 << 20)
        process.process.kill()
        killed = time.monotonic()
        with pytest.raises(PeerDead, match=r"edge 'phase1', request req-dead: .*is gone"):
            await sender.write(grant, tensors, "req-dead")
        return time.monotonic() - killed

    try:
        elapsed = asyncio.run(run())
    finally:
        process.stop()
        sender.close()
    assert elapsed < 2.0


def test_hung_peer_times_out_its_slot_is_fenced_and_the_late_zombie_write_is_not_accepted():
    process = start_receiver("mooncake", EDGE, SLOT_BYTES, 1, quarantine_s=2.0)
    sender = make_sender("mooncake", EDGE, SLOT_BYTES, faults=Faults(), timeout_s=1.0)
    sender.connect(process.location)
    zombie = {"latents": torch.full((SLOT_BYTES // 8,), 7.0)}
    fresh = {"latents": torch.full((SLOT_BYTES // 8,), 9.0)}
    grants = []

    class StopAfterGrant(PipeLink):
        """Stops the receiver (SIGSTOP) right after it granted the first slot."""

        async def request_grant(self, request_id, nbytes):
            grant = await super().request_grant(request_id, nbytes)
            if not grants:
                grants.append(grant)
                freeze(process.process.pid)
            return grant

    link = StopAfterGrant(EDGE, process.conn)

    async def run() -> None:
        start = time.monotonic()
        try:
            with pytest.raises(EdgeTimeout, match=r"edge 'phase1', request req-hung: .*did not finish in 1.0 s"):
                await send_tensors(sender, link, zombie, "req-hung")
            elapsed = time.monotonic() - start
        finally:
            os.kill(process.process.pid, signal.SIGCONT)
        assert 1.0 <= elapsed < 1.5, elapsed
        grant = grants[0]

        # The write the sender gave up on lands once the receiver runs again, into the fenced slot.
        deadline = time.monotonic() + 5
        while (peek := await link.peek(grant.slot, SLOT_BYTES // 2))["sha256"] != tensor_sha256(zombie["latents"]):
            assert time.monotonic() < deadline, "the late write never landed"
            await asyncio.sleep(0.05)
        assert peek["state"] == "fenced" and peek["generation"] == grant.generation + 1

        # Its bytes verify against the manifest it was written for, but that grant's generation is gone.
        staged = bytearray(SLOT_BYTES // 2)
        headers, digests = pack(zombie, staged, hashing=True)
        stale = Manifest(
            edge=EDGE, request_id="req-hung", slot=grant.slot, generation=grant.generation, nbytes=len(staged),
            tensors=headers, tensor_digests=digests, digest=combine(EDGE, "req-hung", headers, digests),
        )
        ack = await link.deliver(stale)
        assert not ack.ok and "fenced" in ack.reason

        # The fenced slot is not granted again before its quarantine ends ...
        with pytest.raises(SlotsExhausted, match="1 fenced") as info:
            await link.request_grant("req-next", SLOT_BYTES // 2)
        await asyncio.sleep(info.value.retry_after_s + 0.05)
        # ... and afterwards carries the next request's bytes at the new generation.
        manifest = await send_tensors(sender, link, fresh, "req-next")
        assert manifest.slot == grant.slot and manifest.generation == grant.generation + 1
        assert link.received["req-next"] == {"latents": tensor_sha256(fresh["latents"])}
        assert (await link.peek(grant.slot, SLOT_BYTES // 2))["sha256"] == tensor_sha256(fresh["latents"])

    try:
        asyncio.run(run())
    finally:
        process.stop()
        sender.close()


def test_shm_edge_between_processes_delivers_bit_exact():
    process = start_receiver("shm", EDGE, SLOT_BYTES, 2, quarantine_s=1.0)
    sender = make_sender("shm", EDGE, SLOT_BYTES, faults=Faults())
    sender.connect(process.location)
    link = PipeLink(EDGE, process.conn)
    rng = random.Random(7)

    async def run() -> None:
        for i in range(20):
            tensors = random_payload(rng)
            sender.faults.arm(corrupt=1)
            manifest = await send_tensors(sender, link, tensors, f"shm-{i}")
            assert link.received[f"shm-{i}"] == {name: tensor_sha256(t) for name, t in tensors.items()}
            link.release(manifest)

    try:
        asyncio.run(run())
    finally:
        process.stop()
        sender.close()
    assert [a.ok for a in link.acks] == [False, True] * 20
