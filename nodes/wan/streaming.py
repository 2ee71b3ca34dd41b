"""The Wan VAE decode one latent frame at a time, each chunk of video frames handed out as soon as it exists.

``AutoencoderKLWan._decode`` runs ``post_quant_conv`` over every latent frame, then the decoder over one latent
frame at a time (the first gives one video frame, each later one four), its causal convolutions carrying the
last frames they saw in ``_feat_map``; it concatenates, unpatchifies (Wan2.2) and clamps. :func:`decode_by_frame`
makes the same calls in the same order and yields each frame's output unpatchified and clamped, which are
per-frame operations: the chunks concatenated are bit for bit what ``decode`` returns
(tests/unit/test_wan_streaming.py).

When the VAE's ``decode`` is not its class's own (a graph backend installed its step graphs, see
:mod:`nodes.wan.exports`) or tiling is on (tiles decode the whole clip per tile), frames cannot be had early:
:func:`decodes_by_frame` says so and the stage decodes as always, handing the frames out in one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


def decodes_by_frame(vae: torch.nn.Module) -> bool:
    """Whether :func:`decode_by_frame` computes what ``vae.decode`` computes."""
    return isinstance(vae, AutoencoderKLWan) and "decode" not in vars(vae) and not vae.use_tiling


def decode_by_frame(vae: AutoencoderKLWan, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Decoded video [B, C, f, H, W] in [-1, 1], one latent frame of ``z`` [B, C, F, h, w] after the other."""
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            first = {"first_chunk": True} if i == 0 else {}
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **first)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()
