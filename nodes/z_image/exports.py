"""What of Z-Image's stages a graph backend runs (engine.backends): the VAE decode, a plain graph per image size.

The module calls AutoencoderKL's ``decode`` unbound, so the replacement installed on the VAE instance never
calls itself.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from engine.backends.recipe import Call, ExportRecipe, TensorSig, dtype_name, replace_method
from engine.stages import Stage

RECIPE_VERSION = 1


class Decode(torch.nn.Module):
    """Scaled and shifted latents [1, C, h, w] to the image [1, 3, H, W] in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return type(self.vae).decode(self.vae, latents, return_dict=False)[0]


def export_recipes(stage: Stage) -> tuple[ExportRecipe, ...]:
    if stage.spec.name != "vae_decode":
        return ()
    pipe = stage.pipe  # type: ignore[attr-defined] - every Z-Image stage holds its pipeline
    vae = pipe.vae

    def latents(request) -> tuple[TensorSig, ...]:  # noqa: ANN001 - ZImageRequest
        scale = pipe.vae_scale_factor
        shape = (1, vae.config.latent_channels, request.height // scale, request.width // scale)
        return (TensorSig(shape, dtype_name(vae.dtype)),)

    def install(call: Call):
        def decode(z: torch.Tensor, return_dict: bool = True):
            (image,) = call(z)
            return DecoderOutput(sample=image) if return_dict else (image,)
        return replace_method(vae, "decode", decode)

    return (ExportRecipe("decode", RECIPE_VERSION, Decode(vae), ("latents",), ("image",), latents, install),)
