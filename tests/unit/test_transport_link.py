"""send_tensors over the in-process link, on the shm and inproc transports, with injected faults."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.errors import EdgeTimeout, IntegrityError, TransportError
from engine.transport import LocalLink, Manifest, make_receiver, make_sender, send_tensors
from engine.transport.errors import SlotsExhausted
from engine.transport.faults import ENV_VAR, FaultPlan, Faults
from engine.transport.pool import SlotState


def payload() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "prompt_embeds": torch.randn(2, 7, 16, generator=gen).to(torch.bfloat16),
        "mask": torch.rand(2, 7, generator=gen) > 0.5,
        "latents": torch.randn(1, 4, 3, 8, 8, generator=gen),
    }


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture
def shm_edge():
    receiver = make_receiver("shm", "phase1", slot_bytes=1 << 16, slots=2, quarantine_s=0.05)
    sender = make_sender("shm", "phase1", max_bytes=1 << 16, faults=Faults())
    yield receiver, sender
    sender.close()
    receiver.close()


def test_shm_delivers_bit_exact_views_of_the_shared_segment(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    tensors = payload()
    manifest = asyncio.run(send_tensors(sender, link, tensors, "req-1"))
    views = link.delivered["req-1"]
    assert all(same_bytes(views[k], tensors[k]) for k in tensors)
    slot = receiver._slot_bytes(manifest.slot)
    assert views["latents"].untyped_storage().data_ptr() == slot.untyped_storage().data_ptr()
    receiver.release(manifest)
    assert receiver.pool.state(manifest.slot).state is SlotState.FREE


def test_flipped_bit_is_detected_named_and_retransmitted(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    sender.faults.arm(corrupt=1)
    tensors = payload()
    asyncio.run(send_tensors(sender, link, tensors, "req-1"))
    assert [a.ok for a in link.acks] == [False, True]
    assert len(link.acks[0].tensors) == 1 and link.acks[0].tensors[0] in tensors
    assert "digest mismatch in tensor(s)" in link.acks[0].reason
    assert all(same_bytes(link.delivered["req-1"][k], tensors[k]) for k in tensors)


def test_integrity_none_moves_bytes_unhashed_but_still_binds_the_headers():
    receiver = make_receiver("shm", "phase1", slot_bytes=1 << 16, slots=2, integrity="none")
    sender = make_sender("shm", "phase1", max_bytes=1 << 16, faults=Faults(), integrity="none")
    try:
        link = LocalLink(receiver)
        tensors = payload()
        manifest = asyncio.run(send_tensors(sender, link, tensors, "req-1"))
        assert manifest.tensor_digests == ()
        assert all(same_bytes(link.delivered["req-1"][k], tensors[k]) for k in tensors)
        sender.faults.arm(corrupt=1)  # nothing hashes the bytes, so a flipped bit goes through: that is what "none" means
        asyncio.run(send_tensors(sender, link, tensors, "req-2"))
        assert link.acks[-1].ok and sender.faults.injected[0].startswith("corrupt@")
        assert not all(same_bytes(link.delivered["req-2"][k], tensors[k]) for k in tensors)
        receiver.release(manifest)
        grant = receiver.grant("req-3", manifest.nbytes)
        renamed = manifest.model_copy(update={"request_id": "req-3", "slot": grant.slot, "generation": grant.generation})
        ack = asyncio.run(link.deliver(renamed))  # the manifest digest still binds edge, request and headers
        assert not ack.ok and "manifest digest mismatch" in ack.reason
    finally:
        sender.close()
        receiver.close()


def test_integrity_setting_must_agree_on_both_ends():
    receiver = make_receiver("shm", "phase1", slot_bytes=1 << 16, slots=1, integrity="xxh3-128")
    sender = make_sender("shm", "phase1", max_bytes=1 << 16, faults=Faults(), integrity="none")
    try:
        with pytest.raises(IntegrityError, match="0 digests for 3 tensors on an edge with integrity xxh3-128"):
            asyncio.run(send_tensors(sender, LocalLink(receiver), payload(), "req-1", retries=0))
    finally:
        sender.close()
        receiver.close()
    with pytest.raises(ValueError, match="integrity must be one of xxh3-128, none, got 'md5'"):
        make_receiver("shm", "phase1", slot_bytes=1 << 16, slots=1, integrity="md5")


def big_payload() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {"latents": torch.randn(3 << 20, generator=gen), "mask": torch.ones(9, dtype=torch.bool)}  # 12 MiB + 9 B


def test_receiver_hashes_landed_ranges_ahead_and_only_the_rest_at_delivery(monkeypatch):
    from engine.transport import payload as payload_module

    receiver = make_receiver("shm", "phase1", slot_bytes=16 << 20, slots=1)
    sender = make_sender("shm", "phase1", max_bytes=16 << 20, faults=Faults())
    hashed_at_delivery: list[int] = []
    run = payload_module._run

    class HintingLink(LocalLink):
        async def deliver(self, manifest):  # the first 8 MiB of latents "landed" before the rest
            receiver.landed(manifest.slot, manifest.generation, manifest.request_id, [(0, 8 << 20)])
            monkeypatch.setattr(payload_module, "_run", lambda chunks, hashing: hashed_at_delivery.append(
                sum(len(c.data) for c in chunks)) or run(chunks, hashing))
            try:
                return await super().deliver(manifest)
            finally:
                monkeypatch.setattr(payload_module, "_run", run)

    try:
        link = HintingLink(receiver)
        tensors = big_payload()
        asyncio.run(send_tensors(sender, link, tensors, "req-1"))
        assert [a.ok for a in link.acks] == [True]
        assert all(same_bytes(link.delivered["req-1"][k], tensors[k]) for k in tensors)
        assert hashed_at_delivery == [(12 << 20) - (8 << 20) + 9]  # 4 MiB of latents and the mask
    finally:
        sender.close()
        receiver.close()


def test_a_hint_for_bytes_that_had_not_landed_fails_verification_and_the_retransmission_passes():
    receiver = make_receiver("shm", "phase1", slot_bytes=16 << 20, slots=1)
    sender = make_sender("shm", "phase1", max_bytes=16 << 20, faults=Faults())

    class EarlyLink(LocalLink):
        async def request_grant(self, request_id, nbytes):
            grant = await super().request_grant(request_id, nbytes)
            if not self.acks:  # the slot still holds zeros: these digests describe the wrong bytes
                receiver.landed(grant.slot, grant.generation, request_id, [(0, 4 << 20)])
            return grant

    try:
        link = EarlyLink(receiver)
        tensors = big_payload()
        asyncio.run(send_tensors(sender, link, tensors, "req-1"))
        assert [a.ok for a in link.acks] == [False, True] and link.acks[0].tensors == ("latents",)
        assert all(same_bytes(link.delivered["req-1"][k], tensors[k]) for k in tensors)
    finally:
        sender.close()
        receiver.close()


def test_persistent_corruption_fails_naming_edge_and_tensor_and_fences_the_slot(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    tensors = {"latents": torch.ones(64)}
    sender.faults.arm(corrupt=3)
    with pytest.raises(IntegrityError, match=r"edge 'phase1', request req-1: 'latents' failed verification on 3 attempts"):
        asyncio.run(send_tensors(sender, link, tensors, "req-1", retries=2))
    assert [s for s in (receiver.pool.state(i) for i in range(2)) if s.state is SlotState.FENCED]


def test_dropped_write_is_detected_and_retransmitted(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    sender.faults.arm(drop=1)
    tensors = payload()
    asyncio.run(send_tensors(sender, link, tensors, "req-1"))
    assert sender.faults.injected == ["drop"] and [a.ok for a in link.acks] == [False, True]


def test_delayed_write_does_not_block_the_event_loop(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    sender.faults.arm(delay=1, delay_s=0.2)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main():
        task = asyncio.create_task(ticker())
        await send_tensors(sender, link, payload(), "req-1")
        task.cancel()

    asyncio.run(main())
    assert ticks >= 10


def test_stale_generation_manifest_is_refused_after_a_fence(shm_edge):
    receiver, sender = shm_edge
    grant = receiver.grant("req-1", 1024)
    manifest = asyncio.run(sender.write(grant, {"x": torch.ones(8)}, "req-1"))
    assert receiver.fence(grant)
    with pytest.raises(TransportError, match="slot was fenced"):
        receiver.open(manifest)


def test_tampered_manifest_is_refused(shm_edge):
    receiver, sender = shm_edge
    grant = receiver.grant("req-1", 1024)
    manifest = asyncio.run(sender.write(grant, {"x": torch.ones(8)}, "req-1"))
    header = manifest.tensors[0].model_copy(update={"shape": (2, 4)})
    with pytest.raises(IntegrityError, match="headers, edge or request id were altered"):
        receiver.open(manifest.model_copy(update={"tensors": (header,)}))
    assert receiver.open(manifest)["x"].shape == (8,)


def test_grant_errors_say_which(shm_edge):
    receiver, _ = shm_edge
    with pytest.raises(TransportError, match="exceeds the slot size of 65536"):
        receiver.grant("req-1", (1 << 16) + 1)
    receiver.grant("req-1", 10)
    receiver.grant("req-2", 10)
    with pytest.raises(SlotsExhausted, match="2 in use"):
        receiver.grant("req-3", 10)


def test_failed_write_fences_the_slot():
    class FailingLink(LocalLink):
        async def deliver(self, manifest: Manifest):
            raise AssertionError("a failed write must not be delivered")

    class HungSender:
        edge = "phase1"

        async def write(self, grant, tensors, request_id, on_landed=None):
            raise EdgeTimeout("write did not finish", edge="phase1", request_id=request_id)

    receiver = make_receiver("inproc", "phase1", slot_bytes=1024, slots=1, quarantine_s=60)
    with pytest.raises(EdgeTimeout):
        asyncio.run(send_tensors(HungSender(), FailingLink(receiver), {"x": torch.ones(4)}, "req-1"))
    assert receiver.pool.state(0).state is SlotState.FENCED
    with pytest.raises(SlotsExhausted, match="1 fenced"):
        receiver.grant("req-2", 16)


def test_inproc_hands_over_the_same_tensors():
    receiver = make_receiver("inproc", "phase1", slot_bytes=1 << 16, slots=1)
    sender = make_sender("inproc", "phase1", max_bytes=1 << 16)
    link = LocalLink(receiver)
    tensors = payload()
    asyncio.run(send_tensors(sender, link, tensors, "req-1"))
    assert all(link.delivered["req-1"][k] is tensors[k] for k in tensors)
    receiver.close()


def test_faults_from_environment_apply_only_to_named_edges(monkeypatch):
    monkeypatch.setenv(ENV_VAR, FaultPlan(corrupt=2, edges=("phase2",)).model_dump_json())
    assert Faults.from_env("phase2").plan.corrupt == 2
    assert Faults.from_env("phase1").plan.corrupt == 0


def test_public_surface():
    import engine.transport as transport

    assert sorted(transport.__all__) == sorted([
        "ALIGNMENT", "Ack", "EdgeLink", "FaultPlan", "Faults", "LocalLink", "Manifest", "PayloadMismatch", "Receiver",
        "Sender", "SlotGrant", "SlotsExhausted", "TRANSPORTS", "TensorHeader", "accept", "make_receiver",
        "make_sender", "pack", "payload_nbytes", "send_tensors", "tensor_digests", "unpack",
    ])
    assert all(hasattr(transport, name) for name in transport.__all__)
    with pytest.raises(ValueError, match="unknown transport 'rdma'; expected one of mooncake, shm, inproc"):
        make_receiver("rdma", "phase1", 1024, 1)


def test_unacknowledged_delivery_fences_the_slot(shm_edge):
    receiver, sender = shm_edge

    class LostAck(LocalLink):
        async def deliver(self, manifest):
            raise EdgeTimeout("no acknowledgement in 1 s", edge="phase1", request_id=manifest.request_id)

    with pytest.raises(EdgeTimeout, match="no acknowledgement"):
        asyncio.run(send_tensors(sender, LostAck(receiver), {"x": torch.ones(4)}, "req-1"))
    assert [receiver.pool.state(i).state for i in range(2)].count(SlotState.FENCED) == 1


def test_concurrent_sends_on_one_sender_each_arrive_intact(shm_edge):
    receiver, sender = shm_edge
    link = LocalLink(receiver)
    payloads = {f"req-{i}": {"x": torch.full((1000,), float(i))} for i in range(2)}

    async def main():
        await asyncio.gather(*(send_tensors(sender, link, t, rid) for rid, t in payloads.items()))

    asyncio.run(main())
    assert all(torch.equal(link.delivered[rid]["x"], t["x"]) for rid, t in payloads.items())


def test_delivery_into_a_slot_fenced_meanwhile_is_refused_without_retransmitting(shm_edge):
    receiver, sender = shm_edge

    class FenceBeforeDelivery(LocalLink):
        async def deliver(self, manifest):
            self.receiver.fence(manifest)
            return await super().deliver(manifest)

    link = FenceBeforeDelivery(receiver)
    with pytest.raises(TransportError, match="refused the delivery: .*slot was fenced") as info:
        asyncio.run(send_tensors(sender, link, {"x": torch.ones(4)}, "req-1"))
    assert not isinstance(info.value, IntegrityError)
    assert len(link.acks) == 1 and not link.acks[0].retryable
