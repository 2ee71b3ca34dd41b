"""A receiver accepts only what the plan expects on its edge for the request: every tensor's name, dtype and
shape, evaluated from the stages' declarations for the request's parameters and the model's configs. Anything
else is refused before verification, not retryable, naming the edge, the tensor and both shapes."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.errors import TransportError
from engine.families import get_family
from engine.plan.build import plan_graph
from engine.worker.contract import WorkerSpec, worker_specs
from engine.worker.inbound import InboundShapes
from engine.transport import LocalLink, Manifest, TensorHeader, make_receiver, make_sender, send_tensors
from engine.transport.expect import Expected, mismatch
from engine.transport.faults import Faults
from engine.transport.pool import SlotState

ROOT = Path(__file__).resolve().parents[2]
LATENTS = Expected("latents", "float32", (1, 60, 64), optional=False, variable=())
PROMPT = Expected("prompt_embeds", "bfloat16", (1, 512, 32), optional=False, variable=(1,))
NEGATIVE = Expected("negative_prompt_embeds", "bfloat16", (1, 512, 32), optional=True, variable=(1,))


def manifest(*tensors: tuple[str, str, tuple[int, ...]]) -> Manifest:
    headers = []
    for name, dtype, shape in tensors:
        nbytes = torch.empty(shape, dtype=getattr(torch, dtype)).nbytes
        headers.append(TensorHeader(name=name, dtype=dtype, shape=shape, offset=0, nbytes=nbytes))
    return Manifest(edge="phase1", request_id="r1", slot=0, generation=0, nbytes=0, tensors=tuple(headers),
                    tensor_digests=(), digest="0" * 32)


@pytest.mark.parametrize(("tensors", "why"), [
    ([("prompt_embeds", "bfloat16", (1, 7, 32)), ("negative_prompt_embeds", "bfloat16", (1, 512, 32))], None),
    ([("prompt_embeds", "bfloat16", (1, 0, 32))], None),
    ([("prompt_embeds", "bfloat16", (1, 513, 32))],
     "tensor 'prompt_embeds' has shape [1, 513, 32]; the plan expects [1, 512, 32] (dimension 1 at most) for this request"),
    ([("prompt_embeds", "bfloat16", (1, 7, 31))],
     "tensor 'prompt_embeds' has shape [1, 7, 31]; the plan expects [1, 512, 32] (dimension 1 at most) for this request"),
    ([("prompt_embeds", "bfloat16", (7, 32))],
     "tensor 'prompt_embeds' has shape [7, 32]; the plan expects [1, 512, 32] (dimension 1 at most) for this request"),
    ([("prompt_embeds", "float32", (1, 7, 32))], "tensor 'prompt_embeds' is float32; the plan expects bfloat16"),
    ([("negative_prompt_embeds", "bfloat16", (1, 7, 32))],
     "tensor 'prompt_embeds' is missing; the plan has this edge carry it"),
    ([("prompt_embeds", "bfloat16", (1, 7, 32)), ("image_embeds", "bfloat16", (1, 1, 1))],
     "tensor 'image_embeds' is not one the plan has this edge carry (prompt_embeds, negative_prompt_embeds)"),
    ([("prompt_embeds", "bfloat16", (1, 7, 32)), ("prompt_embeds", "bfloat16", (1, 7, 32))],
     "a tensor name appears twice in the manifest"),
], ids=["shorter-prompt-and-optional", "empty-prompt", "past-the-bound", "wrong-width", "wrong-rank", "dtype",
        "missing", "unknown", "twice"])
def test_each_difference_from_the_plan_is_named(tensors, why):
    assert mismatch(manifest(*tensors), [PROMPT, NEGATIVE]) == why


def test_a_fixed_dimension_must_match_exactly():
    assert mismatch(manifest(("latents", "float32", (1, 60, 64))), [LATENTS]) is None
    assert mismatch(manifest(("latents", "float32", (1, 15, 64))), [LATENTS]) == (
        "tensor 'latents' has shape [1, 15, 64]; the plan expects [1, 60, 64] for this request")


@pytest.fixture
def phase2():
    receiver = make_receiver("shm", "phase2", slot_bytes=1 << 16, slots=1, quarantine_s=60)
    sender = make_sender("shm", "phase2", max_bytes=1 << 16, faults=Faults())
    yield receiver, sender
    sender.close()
    receiver.close()


def test_a_misshaped_payload_is_refused_before_verification_and_its_slot_given_back(phase2, monkeypatch):
    receiver, sender = phase2
    opened: list[str] = []
    monkeypatch.setattr(receiver, "open", lambda manifest: opened.append(manifest.request_id))  # verification
    link = LocalLink(receiver, expected=[LATENTS])
    sender.faults.arm(misshape=1)

    with pytest.raises(TransportError) as caught:
        asyncio.run(send_tensors(sender, link, {"latents": torch.randn(1, 60, 64)}, "r1"))

    assert str(caught.value) == ("edge 'phase2', request r1: the receiver refused the delivery: tensor 'latents' has "
                                 "shape [1, 60, 63]; the plan expects [1, 60, 64] for this request")
    assert sender.faults.injected == ["misshape@latents"]
    assert [(a.ok, a.retryable) for a in link.acks] == [(False, False)]  # one delivery: sending again cannot help
    assert opened == [] and link.delivered == {}
    assert receiver.pool.state(0).state is SlotState.FREE  # given back at once, not fenced for the quarantine


def test_a_payload_as_planned_is_verified_and_delivered(phase2):
    receiver, sender = phase2
    link = LocalLink(receiver, expected=[LATENTS])
    latents = torch.randn(1, 60, 64)
    asyncio.run(send_tensors(sender, link, {"latents": latents}, "r1"))
    assert [a.ok for a in link.acks] == [True] and torch.equal(link.delivered["r1"]["latents"], latents)


# -- what a worker expects, from its spec ---------------------------------------------------------------


def decoder_spec(tmp_path: Path, vae_downsample: list[bool]) -> WorkerSpec:
    """The decoder's spec in the Qwen-Image T2I graph, for the real model's configs with another VAE, as the
    worker reads it from its JSON file."""
    model = tmp_path / "model"
    shutil.copytree(ROOT / "configs" / "qwen-image", model)
    vae = model / "vae" / "config.json"
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "temperal_downsample": vae_downsample}))
    plan, _, _ = plan_graph(ROOT / "graphs" / "qwen_image_t2i.yaml", [f"model.path={model}"])
    spec = next(s for s in worker_specs(plan, run_id="t", source=model, out_dir=tmp_path, save_frames=False,
                                        heartbeat_s=1.0, broker=lambda node, replica: {}) if s.node == "decoder")
    spec.write(tmp_path / "decoder.json")
    return WorkerSpec.read(tmp_path / "decoder.json")


@pytest.mark.parametrize(("downsample", "tokens"), [([False, True, True], 15), ([False, True], 60)], ids=["8x", "4x"])
def test_the_expected_shapes_are_the_plans_for_the_request_and_the_model(tmp_path, downsample, tokens):
    spec = decoder_spec(tmp_path, downsample)
    inbound = InboundShapes(spec, get_family("qwen_image"))
    request = {"prompt": "a fox", "height": 48, "width": 80, "seed": 3}
    assert inbound.expected("phase2", request) == (Expected("latents", "float32", (1, tokens, 64), False, ()),)
    larger = inbound.expected("phase2", {**request, "height": 96})
    assert larger[0].shape == (1, 2 * tokens, 64)
