"""The latent geometry of a Qwen-Image model, from its component configs (no torch import).

The pipelines read it off their VAE (``vae_scale_factor``, ``latent_channels``) and fall back to Qwen-Image's
values (8, 16) when built without one, which is how the denoising node runs: every stage takes it from the
configs instead, so a model with another VAE runs as its monolithic pipeline does. The checks refuse, by
config field, what these stages cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.config_fields import ConfigFields
from engine.stages import ConfigProblem, Configs, RequestProblem, token_grid_problems

#: Requested heights and widths are multiples of this many pixels.
SIZE_STEP = 16
#: The pipelines pack latents in 2x2 patches, one transformer token each.
PACKING = 2


@dataclass(frozen=True)
class LatentGeometry:
    channels: int  #: latent channels, ``vae.z_dim``
    scale: int  #: spatial downsampling of the VAE, ``2 ** len(vae.temperal_downsample)`` as the pipelines count it

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the image patch one packed latent token covers."""
        return PACKING * self.scale


def latent_geometry(configs: Configs) -> LatentGeometry:
    """The geometry of configs that passed :func:`config_problems`."""
    vae = configs["vae"]
    return LatentGeometry(channels=vae["z_dim"], scale=2 ** len(vae["temperal_downsample"]))


def request_problems(geometry: LatentGeometry, height: int, width: int) -> list[RequestProblem]:
    """Sizes off the model's token grid, by request field (none for a model whose token divides the request step,
    which :func:`config_problems` asks of every model today)."""
    step = geometry.token_pixels
    return token_grid_problems({"height": height, "width": width}, {"height": step, "width": step},
                               f"a packed latent token covers {step} pixels ({PACKING} latent pixels of the vae's {geometry.scale}x downsampling)")


def config_problems(configs: Configs) -> list[ConfigProblem]:
    """What in the VAE and transformer configs the Qwen-Image stages cannot run, by config field."""
    fields = ConfigFields(configs)
    z_dim = fields.get("vae", "z_dim", int)
    downsample = fields.get("vae", "temperal_downsample", list)
    statistics = {key: fields.get("vae", key, list) for key in ("latents_mean", "latents_std")}
    patch = fields.get("transformer", "patch_size", int)
    in_channels = fields.get("transformer", "in_channels", int)
    out_channels = fields.get("transformer", "out_channels", int)
    if fields.problems:
        return fields.problems

    geometry = latent_geometry(configs)
    if SIZE_STEP % geometry.token_pixels:
        fields.refuse("vae", "temperal_downsample", f"{len(downsample)} downsamplings: a packed latent token covers "
                      f"{geometry.token_pixels} pixels, which must divide {SIZE_STEP} (request sizes are multiples of it)")
    for key, values in statistics.items():
        if len(values) != z_dim:
            fields.refuse("vae", key, f"{len(values)} values for vae z_dim = {z_dim} latent channels")
    if patch != PACKING:
        fields.refuse("transformer", "patch_size",
                      f"{patch}; the Qwen-Image pipelines pack latents in {PACKING}x{PACKING} patches")
    if in_channels != PACKING**2 * z_dim:
        fields.refuse("transformer", "in_channels", f"{in_channels}; packed latents of vae z_dim = {z_dim} channels "
                      f"have {PACKING**2 * z_dim}")
    if out_channels != z_dim:
        fields.refuse("transformer", "out_channels",
                      f"{out_channels}; the transformer predicts the vae's z_dim = {z_dim} channels")
    return fields.problems
