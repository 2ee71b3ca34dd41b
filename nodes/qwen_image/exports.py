"""What of Qwen-Image's stages a graph backend runs (engine.backends): the VAE's decode and encode of one frame.

The decode is exported with dynamic height and width (one graph serves every size of the graph's limits); the
encode as a plain graph per image size (its input's size follows the input image, which the limits do not
bound). Both run the causal 3D VAE on one frame, whose convolution cache starts empty on every call
(``clear_cache``), so no state crosses calls.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from engine.backends.modules import UnboundCall, install_decode
from engine.backends.recipe import Call, ExportRecipe, TensorSig, dtype_name, replace_method
from engine.stages import Stage
from nodes.qwen_image.family import QwenImageEditRequest

RECIPE_VERSION = 1


def export_recipes(stage: Stage) -> tuple[ExportRecipe, ...]:
    pipe = stage.pipe  # type: ignore[attr-defined] - every Qwen-Image stage holds its pipeline
    vae = pipe.vae
    dtype = dtype_name(vae.dtype)
    if stage.spec.name == "vae_decode":
        def latents(request) -> tuple[TensorSig, ...]:  # noqa: ANN001 - the task's request
            scale = pipe.vae_scale_factor
            return (TensorSig((1, vae.config.z_dim, 1, request.height // scale, request.width // scale), dtype),)

        # unpacked, de-normalised latents [1, C, 1, h, w] to the image [1, 3, 1, H, W] in [-1, 1]
        return (ExportRecipe("decode", RECIPE_VERSION, UnboundCall(vae, "decode"), ("latents",), ("image",), latents,
                             install_decode(vae), dynamic=((3, 4),)),)
    if stage.spec.name == "vae_encode":
        from nodes.qwen_image.stages import resized_input_image

        def pixels(request) -> tuple[TensorSig, ...]:  # noqa: ANN001
            assert isinstance(request, QwenImageEditRequest)
            image = resized_input_image(pipe, request)
            return (TensorSig((1, 3, 1, image.height, image.width), dtype),)

        def install_encode(call: Call):
            def encode(x: torch.Tensor, return_dict: bool = True):
                (parameters,) = call(x)
                posterior = DiagonalGaussianDistribution(parameters)
                return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)
            return replace_method(vae, "encode", encode)

        # the image [1, 3, 1, H, W] in [-1, 1] to the latent distribution's parameters (mean and log-variance)
        encode = UnboundCall(vae, "encode", pick=lambda out: out[0].parameters)
        return (ExportRecipe("encode", RECIPE_VERSION, encode, ("pixels",), ("moments",), pixels, install_encode),)
    return ()
