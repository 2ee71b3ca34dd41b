"""Z-Image stages, run as diffusers' ZImagePipeline runs them.

Each stage builds the pipeline around only the components its node holds (the others None) and calls the
pipeline's own methods for prompt encoding, latent preparation and image post-processing, so that a
disaggregated run reproduces the monolithic one. The parts the pipeline writes inline in ``__call__`` (the
denoising loop with its guidance, the latent de-normalisation before decoding) follow that code line for line.

Noise comes from a CPU ``torch.Generator`` seeded with the request's seed, as with
``pipeline(..., generator=torch.Generator().manual_seed(seed))``: the same noise on any device.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                          retrieve_timesteps)

from engine.errors import ModelError
from engine.preview.picture import flow_x0, offer
from engine.stages import Configs, LoadedComponents, Stage, StageSpec
from engine.stepcache.cache import StepCache
from nodes.z_image.family import MAX_SEQUENCE_LENGTH, ZImageFamily, ZImageRequest
from nodes.z_image.geometry import LatentGeometry, latent_geometry
from nodes.z_image.preview import projection
from nodes.z_image.stepcache import ZImageBlocks

#: Pipeline constructor argument of each component (the VAE decoder half is the pipeline's ``vae``).
_PIPELINE_ARGUMENT = {
    "tokenizer": "tokenizer",
    "text_encoder": "text_encoder",
    "transformer": "transformer",
    "scheduler": "scheduler",
    "vae_decoder": "vae",
}


def build_pipeline(components: LoadedComponents, names: tuple[str, ...], geometry: LatentGeometry) -> ZImagePipeline:
    """A ZImagePipeline holding ``names`` (from ``components``) and None for the rest.

    Without a VAE the pipeline would assume an 8x one: it gets the model's instead.
    """
    arguments = dict.fromkeys(_PIPELINE_ARGUMENT.values())
    for name in names:
        if name not in components.objects:
            raise ModelError(f"z_image: the node does not hold component {name!r}")
        arguments[_PIPELINE_ARGUMENT[name]] = components.objects[name]
    pipe = ZImagePipeline(**arguments)
    if pipe.vae is None:  # what __init__ reads off the VAE
        pipe.vae_scale_factor = geometry.scale
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=geometry.token_pixels)
    return pipe


class ZImageStage(Stage):
    """A stage over a pipeline that holds exactly the stage's components."""

    def __init__(self, spec: StageSpec, components: LoadedComponents, device: str, geometry: LatentGeometry):
        self.spec = spec
        self.device = torch.device(device)
        self.pipe = build_pipeline(components, spec.components, geometry)


class TextEncode(ZImageStage):
    """Prompt embeddings of the real tokens, as ``encode_prompt`` returns them for one prompt."""

    def run(self, request, inputs, progress):
        assert isinstance(request, ZImageRequest)
        outputs = {}
        for part in self.parts(request):
            outputs.update(self.run_part(part, request))
        return outputs

    def parts(self, request) -> tuple[str, ...]:
        return ("prompt", "negative_prompt") if request.guidance else ("prompt",)

    @torch.no_grad()
    def run_part(self, part: str, request) -> dict[str, torch.Tensor]:
        # The pipeline's encode_prompt encodes the prompt and the negative prompt (None as "") in two separate calls
        # of _encode_prompt: one here is one there. It hands over a list of [tokens, dim] tensors, one per prompt; an
        # edge carries [1, tokens, dim].
        text = request.prompt if part == "prompt" else request.negative_prompt or ""
        embeds, _ = self.pipe.encode_prompt(prompt=text, device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {f"{part}_embeds": embeds[0].unsqueeze(0)}


class Denoise(ZImageStage):
    """The flow-matching loop of ``ZImagePipeline.__call__``, from freshly drawn noise to clean latents."""

    @torch.no_grad()
    def run(self, request, inputs, progress):
        assert isinstance(request, ZImageRequest)
        pipe, device = self.pipe, self.device

        # 1. Prompt embeddings as the lists encode_prompt returns, the negative ones only with guidance.
        prompt_embeds = [inputs["prompt_embeds"][0].to(device)]
        negative_prompt_embeds = [inputs["negative_prompt_embeds"][0].to(device)] if request.guidance else []

        # 2. Initial noise, float32, unpacked [1, C, H / s, W / s].
        latents = pipe.prepare_latents(
            1, pipe.transformer.in_channels, request.height, request.width, torch.float32, device,
            torch.Generator().manual_seed(request.seed),
        )

        # 3. Timesteps: linear sigmas, through the scheduler's shift (mu only matters with dynamic shifting).
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        mu = calculate_shift(
            image_seq_len,
            pipe.scheduler.config.get("base_image_seq_len", 256),
            pipe.scheduler.config.get("max_image_seq_len", 4096),
            pipe.scheduler.config.get("base_shift", 0.5),
            pipe.scheduler.config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(request.steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, request.steps, device, sigmas=sigmas, mu=mu)
        pipe.scheduler.set_begin_index(0)

        # 4. Guidance switches off at the steps past cfg_truncation (in normalised time).
        t_norms = ((1000 - timesteps.float()) / 1000).tolist() if request.cfg_truncation <= 1 else None

        # 5. The loop; with guidance the conditional and unconditional inputs go through the transformer together,
        #    one pass of the branch "cond+uncond" in this request's step cache (else of "cond").
        step_cache = StepCache.open(request.cache, ZImageBlocks(pipe.transformer))
        preview = projection(latents.shape[1])
        for i, t in enumerate(timesteps):
            timestep = (1000 - t.expand(latents.shape[0])) / 1000
            guidance_scale = request.guidance_scale
            if t_norms is not None and t_norms[i] > request.cfg_truncation:
                guidance_scale = 0.0
            apply_cfg = request.guidance and guidance_scale > 0

            latent_model_input = latents.to(pipe.transformer.dtype)
            if apply_cfg:
                latent_model_input = latent_model_input.repeat(2, 1, 1, 1)
                embeds, timestep = prompt_embeds + negative_prompt_embeds, timestep.repeat(2)
            else:
                embeds = prompt_embeds
            model_out = step_cache.run("cond+uncond" if apply_cfg else "cond", i, len(timesteps), lambda: pipe.transformer(
                list(latent_model_input.unsqueeze(2).unbind(dim=0)), timestep, embeds, return_dict=False
            )[0])

            if apply_cfg:
                positive, negative = model_out[0].float(), model_out[1].float()
                noise_pred = positive + guidance_scale * (positive - negative)
                if request.cfg_normalization > 0:  # cap the guided norm at a multiple of the conditional one
                    max_norm = torch.linalg.vector_norm(positive) * request.cfg_normalization
                    new_norm = torch.linalg.vector_norm(noise_pred)
                    if new_norm > max_norm:
                        noise_pred = noise_pred * (max_norm / new_norm)
                noise_pred = noise_pred.unsqueeze(0)
            else:
                noise_pred = torch.stack([out.float() for out in model_out], dim=0)

            # The transformer predicts the negated velocity.
            noise_pred = -noise_pred.squeeze(2)
            # A preview of the clean latent this step predicts, when one is due (engine.preview).
            offer(i + 1, len(timesteps), lambda: flow_x0(latents, noise_pred, pipe.scheduler.sigmas[i])[0], preview)
            latents = pipe.scheduler.step(noise_pred.to(torch.float32), t, latents, return_dict=False)[0]
            progress(i + 1, len(timesteps))
        return {"latents": latents}


class VaeDecode(ZImageStage):
    """Latents to an RGB image in [0, 1], as the end of ``ZImagePipeline.__call__``."""

    @torch.no_grad()
    def run(self, request, inputs, progress):
        assert isinstance(request, ZImageRequest)
        vae = self.pipe.vae
        latents = inputs["latents"].to(self.device, vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        # output_type="np" without the numpy conversion: [batch, height, width, 3] float32 in [0, 1]
        image = self.pipe.image_processor.postprocess(image, output_type="pt")
        return {"image": image.permute(0, 2, 3, 1).float()}


_STAGE_TYPES = {"text_encode": TextEncode, "denoise": Denoise, "vae_decode": VaeDecode}


def build_stage(name: str, components: LoadedComponents, device: str, configs: Configs) -> Stage:
    """A runnable stage over already-loaded components (the modules carry their dtype)."""
    spec = {stage.name: stage for stage in ZImageFamily().stages("t2i")}[name]
    return _STAGE_TYPES[name](spec, components, device, latent_geometry(configs))
