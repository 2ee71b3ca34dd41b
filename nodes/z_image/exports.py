"""What of Z-Image's stages a graph backend runs (engine.backends): the VAE decode, one graph with dynamic height
and width serving every size of the graph's limits."""

from __future__ import annotations

from engine.backends.modules import UnboundCall, install_decode
from engine.backends.recipe import ExportRecipe, TensorSig, dtype_name
from engine.stages import Stage

RECIPE_VERSION = 1


def export_recipes(stage: Stage) -> tuple[ExportRecipe, ...]:
    if stage.spec.name != "vae_decode":
        return ()
    pipe = stage.pipe  # type: ignore[attr-defined] - every Z-Image stage holds its pipeline
    vae = pipe.vae

    def latents(request) -> tuple[TensorSig, ...]:  # noqa: ANN001 - ZImageRequest
        scale = pipe.vae_scale_factor
        shape = (1, vae.config.latent_channels, request.height // scale, request.width // scale)
        return (TensorSig(shape, dtype_name(vae.dtype)),)

    # scaled and shifted latents [1, C, h, w] to the image [1, 3, H, W] in [-1, 1]
    return (ExportRecipe("decode", RECIPE_VERSION, UnboundCall(vae, "decode"), ("latents",), ("image",), latents,
                         install_decode(vae), dynamic=((2, 3),)),)
