"""The Wan VAE decode streamed one latent frame at a time gives the frames of today's decode, bit for bit."""

from __future__ import annotations

import pytest
import torch

from engine.stream import listening
from nodes.wan import family
from nodes.wan.presets import build_preset
from tests.unit.wan_support import _ROOT, configs, tiny
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread


def decoder(source, dtype: str = "float32"):
    components = family.load_components("t2v", ("vae_decoder",), source, "cpu", dtype)
    return family.build_stage("t2v", "vae_decode", components, "cpu", dtype, configs(source))


def tiny_ti2v():
    folder = _ROOT / "tiny-ti2v-streaming"
    if not folder.exists():
        build_preset("tiny-ti2v", "t2v", folder)
    return folder


def latents_for(stage, frames: int, seed: int = 0) -> torch.Tensor:
    z_dim = stage.vae.config.z_dim
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, z_dim, frames, 4, 6, generator=generator)


@pytest.mark.parametrize("model", ["tiny", "tiny-ti2v"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_are_todays_frames_bit_for_bit(model, dtype):
    """Wan2.1's VAE and Wan2.2's (patchified), in both dtypes: 1 frame, then 4 per latent frame; concatenated,
    exactly the frames of the decode without a listener."""
    stage = decoder(tiny("t2v") if model == "tiny" else tiny_ti2v(), dtype)
    request = family.request_type("t2v").model_validate({"prompt": "x", "height": 32, "width": 48, "num_frames": 13})
    latents = latents_for(stage, 4).to(stage.vae.dtype)

    plain = stage.run(request, {"latents": latents}, lambda *_: None)["frames"]
    chunks: list[torch.Tensor] = []
    with listening(chunks.append):
        streamed = stage.run(request, {"latents": latents}, lambda *_: None)["frames"]

    assert [c.shape[1] for c in chunks] == [1, 4, 4, 4]
    assert all(c.dtype == torch.float32 and c.shape[0] == 1 and c.shape[-1] == 3 for c in chunks)
    assert torch.equal(torch.cat(chunks, 1), plain)
    assert torch.equal(streamed, plain)


def test_a_sink_that_raises_stops_the_decode_and_leaves_the_vae_clean():
    """A cancelled request stops between chunks; the VAE's cache is cleared, so the next decode is unchanged."""
    stage = decoder(tiny("t2v"))
    request = family.request_type("t2v").model_validate({"prompt": "x", "height": 32, "width": 48, "num_frames": 13})
    latents = latents_for(stage, 4)
    plain = stage.run(request, {"latents": latents}, lambda *_: None)["frames"]
    seen: list[int] = []

    def cancel_after_two(chunk: torch.Tensor) -> None:
        seen.append(chunk.shape[1])
        if len(seen) == 2:
            raise RuntimeError("cancelled")

    with listening(cancel_after_two), pytest.raises(RuntimeError, match="cancelled"):
        stage.run(request, {"latents": latents}, lambda *_: None)
    assert seen == [1, 4]
    assert all(entry is None for entry in stage.vae._feat_map)
    assert torch.equal(stage.run(request, {"latents": latents}, lambda *_: None)["frames"], plain)


def test_a_replaced_decode_hands_its_frames_out_in_one_chunk():
    """A graph backend's installed decode (nodes.wan.exports) is called as before: one chunk, the same frames."""
    stage = decoder(tiny("t2v"))
    request = family.request_type("t2v").model_validate({"prompt": "x", "height": 32, "width": 48, "num_frames": 13})
    latents = latents_for(stage, 4)
    plain = stage.run(request, {"latents": latents}, lambda *_: None)["frames"]
    calls = []
    original = stage.vae.decode

    def installed(z, return_dict=True):
        calls.append(z.shape)
        return original(z, return_dict=return_dict)

    vars(stage.vae)["decode"] = installed
    try:
        chunks: list[torch.Tensor] = []
        with listening(chunks.append):
            frames = stage.run(request, {"latents": latents}, lambda *_: None)["frames"]
    finally:
        vars(stage.vae).pop("decode")
    assert len(calls) == 1 and [c.shape[1] for c in chunks] == [13]
    assert torch.equal(frames, plain) and torch.equal(chunks[0], plain)
