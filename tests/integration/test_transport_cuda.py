"""CUDA tensors cross an edge staged through host memory (runs only where a CUDA device is present)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.transport import LocalLink, make_receiver, make_sender, send_tensors
from engine.transport.faults import Faults

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("transport", ["shm", "mooncake"])
def test_cuda_bf16_tensors_arrive_bit_exact_on_the_host(transport):
    receiver = make_receiver(transport, "phase2", 1 << 22, 1, quarantine_s=0.0)
    sender = make_sender(transport, "phase2", 1 << 22, faults=Faults())
    sender.connect(receiver.location)
    tensors = {"latents": torch.randn(3, 16, 64, 64, device="cuda").to(torch.bfloat16), "step": torch.tensor(7, device="cuda")}
    link = LocalLink(receiver)
    try:
        asyncio.run(send_tensors(sender, link, tensors, "req-cuda"))
        got = link.delivered["req-cuda"]
        assert got["latents"].device.type == "cpu"
        assert torch.equal(got["latents"].view(torch.int16), tensors["latents"].cpu().view(torch.int16))
        assert got["step"].item() == 7
    finally:
        sender.close()
        receiver.close()
