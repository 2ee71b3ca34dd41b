"""The latent geometry of a Z-Image model, from its component configs (no torch import).

ZImagePipeline reads its VAE's downsampling off ``vae.config.block_out_channels`` and falls back to 8 when built
without a VAE, which is how the denoising node runs: every stage takes it from the configs instead, so a model
with another VAE runs as its monolithic pipeline does. The checks refuse, by config field, what these stages
cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.config_fields import ConfigFields
from engine.stages import ConfigProblem, Configs, RequestProblem, token_grid_problems

#: Requested heights and widths are multiples of this many pixels.
SIZE_STEP = 16
#: ZImagePipeline calls the transformer with its default patches: 2x2 pixels of latent, one frame.
PATCH, FRAME_PATCH = 2, 1


@dataclass(frozen=True)
class LatentGeometry:
    channels: int  #: latent channels, ``vae.latent_channels``
    scale: int  #: spatial downsampling of the VAE, ``2 ** (len(vae.block_out_channels) - 1)`` as the pipeline counts it

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the image patch one transformer token covers (the pipeline's size multiple)."""
        return PATCH * self.scale


def latent_geometry(configs: Configs) -> LatentGeometry:
    """The geometry of configs that passed :func:`config_problems`."""
    vae = configs["vae"]
    return LatentGeometry(channels=vae["latent_channels"], scale=2 ** (len(vae["block_out_channels"]) - 1))


def request_problems(geometry: LatentGeometry, height: int, width: int) -> list[RequestProblem]:
    """Sizes off the model's token grid, by request field (none for a model whose token divides the request step,
    which :func:`config_problems` asks of every model today)."""
    step = geometry.token_pixels
    return token_grid_problems({"height": height, "width": width}, {"height": step, "width": step},
                               f"a transformer token covers {step} pixels ({PATCH} latent pixels of the vae's {geometry.scale}x downsampling)")


def config_problems(configs: Configs) -> list[ConfigProblem]:
    """What in the VAE, transformer and text encoder configs the Z-Image stages cannot run, by config field."""
    fields = ConfigFields(configs)
    channels = fields.get("vae", "latent_channels", int)
    fields.get("vae", "block_out_channels", list)
    for key in ("scaling_factor", "shift_factor"):  # the pipeline de-normalises latents with both
        fields.get("vae", key, (int, float))
    in_channels = fields.get("transformer", "in_channels", int)
    patches = fields.get("transformer", "all_patch_size", list)
    frame_patches = fields.get("transformer", "all_f_patch_size", list)
    caption_dim = fields.get("transformer", "cap_feat_dim", int)
    text_dim = fields.get("text_encoder", "hidden_size", int)
    if fields.problems:
        return fields.problems

    geometry = latent_geometry(configs)
    if SIZE_STEP % geometry.token_pixels:
        fields.refuse("vae", "block_out_channels", f"{len(configs['vae']['block_out_channels'])} levels: a transformer "
                      f"token covers {geometry.token_pixels} pixels, which must divide {SIZE_STEP} (request sizes are "
                      "multiples of it)")
    if in_channels != channels:
        fields.refuse("transformer", "in_channels",
                      f"{in_channels}; the transformer denoises the vae's latent_channels = {channels}")
    if PATCH not in patches:
        fields.refuse("transformer", "all_patch_size", f"{patches}; ZImagePipeline runs patches of {PATCH}")
    if FRAME_PATCH not in frame_patches:
        fields.refuse("transformer", "all_f_patch_size", f"{frame_patches}; ZImagePipeline runs frame patches of "
                      f"{FRAME_PATCH}")
    if caption_dim != text_dim:
        fields.refuse("transformer", "cap_feat_dim",
                      f"{caption_dim}; the text encoder's hidden states are hidden_size = {text_dim} wide")
    return fields.problems
