"""Qwen-Image stages, run as diffusers' QwenImagePipeline / QwenImageEditPipeline run them.

Each stage builds the task's pipeline around only the components its node holds (the others None) and
calls the pipeline's own methods for prompt encoding, latent preparation, packing and image
post-processing, so that a disaggregated run reproduces the monolithic one. The parts the pipelines
write inline in ``__call__`` (the denoising loop, the latent de-normalisation before decoding) follow
that code line for line, with the Edit additions switched on by the presence of image latents.

Noise comes from a CPU ``torch.Generator`` seeded with the request's seed, as with
``pipeline(..., generator=torch.Generator().manual_seed(seed))``: the same noise on any device.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from diffusers.utils import load_image

from engine.errors import ModelError, RequestError
from engine.parallel import SINGLE, Split
from engine.preview.picture import flow_x0, offer
from engine.stages import Configs, LoadedComponents, Stage, StageSpec
from engine.stepcache.cache import StepCache
from nodes.qwen_image.family import (
    EDIT_IMAGE_AREA,
    T2I_MAX_SEQUENCE_LENGTH,
    QwenImageEditRequest,
    QwenImageFamily,
    QwenImageRequest,
    edit_aspect_problem,
    edit_prompt_len_bound,
)
from nodes.qwen_image.geometry import LatentGeometry, latent_geometry
from nodes.qwen_image.preview import projection
from nodes.qwen_image.stepcache import QwenImageBlocks

#: Pipeline constructor argument of each component (the VAE halves are both the pipeline's ``vae``).
_PIPELINE_ARGUMENT = {
    "tokenizer": "tokenizer",
    "processor": "processor",
    "text_encoder": "text_encoder",
    "transformer": "transformer",
    "scheduler": "scheduler",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
}


def build_pipeline(
    task: str, components: LoadedComponents, names: tuple[str, ...], geometry: LatentGeometry
) -> QwenImagePipeline:
    """The task's diffusers pipeline holding ``names`` (from ``components``) and None for the rest.

    Without a VAE the pipeline would assume Qwen-Image's (8x, 16 channels): it gets the model's instead.
    """
    cls = QwenImageEditPipeline if task == "edit" else QwenImagePipeline
    arguments = {"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None, "transformer": None}
    if task == "edit":
        arguments["processor"] = None
    for name in names:
        if name not in components.objects:
            raise ModelError(f"qwen_image {task}: the node does not hold component {name!r}")
        arguments[_PIPELINE_ARGUMENT[name]] = components.objects[name]
    pipe = cls(**arguments)
    if pipe.vae is None:  # what __init__ reads off the VAE
        pipe.vae_scale_factor = geometry.scale
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=geometry.token_pixels)
        if isinstance(pipe, QwenImageEditPipeline):
            pipe.latent_channels = geometry.channels
    return pipe


class QwenImageStage(Stage):
    """A stage over a pipeline that holds exactly the stage's components."""

    def __init__(self, task: str, spec: StageSpec, components: LoadedComponents, device: str, geometry: LatentGeometry):
        self.spec = spec
        self.device = torch.device(device)
        self.pipe = build_pipeline(task, components, spec.components, geometry)


class TextEncode(QwenImageStage):
    """Prompt embeddings of the real tokens, as ``_get_qwen_prompt_embeds`` returns them for one prompt."""

    def run(self, request, inputs, progress):
        assert isinstance(request, QwenImageRequest)
        outputs = {}
        for part in self.parts(request):
            outputs.update(self.run_part(part, request))
        return outputs

    def parts(self, request) -> tuple[str, ...]:
        return ("prompt", "negative_prompt") if request.true_cfg else ("prompt",)

    @torch.no_grad()
    def run_part(self, part: str, request) -> dict[str, torch.Tensor]:
        # The pipeline encodes the prompt and the negative prompt in two calls of encode_prompt: one here is one there.
        image = resized_input_image(self.pipe, request) if isinstance(request, QwenImageEditRequest) else None
        embeds, mask = self._encode(getattr(request, part), image)
        return {f"{part}_embeds": embeds, f"{part}_embeds_mask": mask}

    def _encode(self, prompt: str, image) -> tuple[torch.Tensor, torch.Tensor]:
        # A single prompt is never padded: its mask is all ones and its length the real token count.
        if image is None:
            embeds, mask = self.pipe._get_qwen_prompt_embeds(prompt, device=self.device)
            # QwenImagePipeline.encode_prompt keeps the first max_sequence_length tokens
            return embeds[:, :T2I_MAX_SEQUENCE_LENGTH], mask[:, :T2I_MAX_SEQUENCE_LENGTH]
        embeds, mask = self.pipe._get_qwen_prompt_embeds(prompt, image=image, device=self.device)
        bound = edit_prompt_len_bound(self.pipe.text_encoder.config.vision_config.to_dict())
        if embeds.shape[1] > bound:
            raise RequestError(f"the prompt and image make {embeds.shape[1]} tokens; at most {bound} are accepted")
        return embeds, mask


class VaeEncode(QwenImageStage):
    """The Edit input image's normalised latent, as ``QwenImageEditPipeline.prepare_latents`` encodes it."""

    @torch.no_grad()
    def run(self, request, inputs, progress):
        assert isinstance(request, QwenImageEditRequest)
        image = resized_input_image(self.pipe, request)
        pixels = self.pipe.image_processor.preprocess(image, image.height, image.width).unsqueeze(2)
        pixels = pixels.to(device=self.device, dtype=self.pipe.vae.dtype)
        # the Edit pipeline encodes the distribution's mode (argmax): no noise is drawn here
        return {"image_latents": self.pipe._encode_vae_image(pixels, generator=None)}


class Denoise(QwenImageStage):
    """The flow-matching loop of ``QwenImagePipeline.__call__`` (Edit: ``QwenImageEditPipeline.__call__``)."""

    def __init__(self, task: str, spec: StageSpec, components: LoadedComponents, device: str, geometry: LatentGeometry):
        super().__init__(task, spec, components, device, geometry)
        if self.pipe.transformer.config.guidance_embeds:
            raise ModelError("guidance-distilled Qwen-Image transformers (guidance_embeds) are not supported")
        self.parallel = SINGLE
        self.preview = projection(geometry.channels)

    def split(self, split: Split) -> None:
        self.parallel = split

    @torch.no_grad()
    def run(self, request, inputs, progress):
        assert isinstance(request, QwenImageRequest)
        pipe, device = self.pipe, self.device
        tensors = {name: tensor.to(device) for name, tensor in inputs.items()}

        # 1. Prompt embeddings as encode_prompt hands them on (an all-ones mask becomes None).
        prompt_embeds, prompt_embeds_mask = pipe.encode_prompt(
            prompt=None,
            prompt_embeds=tensors["prompt_embeds"],
            prompt_embeds_mask=tensors["prompt_embeds_mask"],
            device=device,
        )
        do_true_cfg = request.true_cfg
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = pipe.encode_prompt(
                prompt=None,
                prompt_embeds=tensors["negative_prompt_embeds"],
                prompt_embeds_mask=tensors["negative_prompt_embeds_mask"],
                device=device,
            )

        # 2. Initial noise (packed), and for Edit the packed image latents and their grid.
        generator = torch.Generator().manual_seed(request.seed)
        num_channels_latents = pipe.transformer.config.in_channels // 4
        height, width = request.height, request.width
        grid = (1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)
        if "image_latents" in tensors:
            image_latents = tensors["image_latents"]
            latents, image_latents = pipe.prepare_latents(
                image_latents, 1, num_channels_latents, height, width, prompt_embeds.dtype, device, generator
            )
            image_grid = (1, *(size // 2 for size in tensors["image_latents"].shape[3:]))
            img_shapes = [[grid, image_grid]]
        else:
            image_latents = None
            latents = pipe.prepare_latents(
                1, num_channels_latents, height, width, prompt_embeds.dtype, device, generator
            )
            img_shapes = [[grid]]

        # 3. Timesteps: linear sigmas, shifted by the image sequence length.
        sigmas = np.linspace(1.0, 1 / request.steps, request.steps)
        mu = calculate_shift(
            latents.shape[1],
            pipe.scheduler.config.get("base_image_seq_len", 256),
            pipe.scheduler.config.get("max_image_seq_len", 4096),
            pipe.scheduler.config.get("base_shift", 0.5),
            pipe.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(pipe.scheduler, request.steps, device, sigmas=sigmas, mu=mu)

        # 4. The loop, with true CFG rescaled to the conditional prediction's norm; the transformer's passes go
        #    through this request's step cache.
        step_cache = StepCache.open(request.cache, QwenImageBlocks(pipe.transformer))
        pipe.scheduler.set_begin_index(0)
        for i, t in enumerate(timesteps):
            latent_model_input = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
            timestep = t.expand(latents.shape[0]).to(latents.dtype)

            def predict(context: str, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                with pipe.transformer.cache_context(context):
                    prediction = step_cache.run(context, i, len(timesteps), lambda: pipe.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep / 1000,
                        guidance=None,
                        encoder_hidden_states_mask=mask,
                        encoder_hidden_states=embeds,
                        img_shapes=img_shapes,
                        attention_kwargs={},
                        return_dict=False,
                    )[0])
                return prediction[:, : latents.size(1)]

            # The conditional and unconditional predictions (on two ranks at once with CFG parallel).
            branches = [lambda: predict("cond", prompt_embeds, prompt_embeds_mask)]
            if do_true_cfg:
                branches.append(lambda: predict("uncond", negative_prompt_embeds, negative_prompt_embeds_mask))
            noise_pred, *uncond = self.parallel.predict(branches)
            if uncond:
                neg_noise_pred = uncond[0]
                comb_pred = neg_noise_pred + request.true_cfg_scale * (noise_pred - neg_noise_pred)
                cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
                noise_pred = comb_pred * (cond_norm / noise_norm)
            # A preview of the clean latents this step predicts, unpacked, when one is due (engine.preview).
            offer(i + 1, len(timesteps), lambda: pipe._unpack_latents(flow_x0(latents, noise_pred, pipe.scheduler.sigmas[i]),
                                                                      height, width, pipe.vae_scale_factor)[0], self.preview)
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            progress(i + 1, len(timesteps))
        return {"latents": latents}


class VaeDecode(QwenImageStage):
    """Packed latents to an RGB image in [0, 1], as the end of the pipelines' ``__call__``."""

    @torch.no_grad()
    def run(self, request, inputs, progress):
        assert isinstance(request, QwenImageRequest)
        pipe, vae = self.pipe, self.pipe.vae
        latents = inputs["latents"].to(self.device)
        latents = pipe._unpack_latents(latents, request.height, request.width, pipe.vae_scale_factor)
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        # output_type="np" without the numpy conversion: [batch, height, width, 3] float32 in [0, 1]
        image = pipe.image_processor.postprocess(image, output_type="pt")
        return {"image": image.permute(0, 2, 3, 1).float()}


_STAGE_TYPES = {"text_encode": TextEncode, "vae_encode": VaeEncode, "denoise": Denoise, "vae_decode": VaeDecode}


def build_stage(task: str, name: str, components: LoadedComponents, device: str, dtype: str, configs: Configs) -> Stage:
    """A runnable stage over already-loaded components (the modules carry their dtype)."""
    spec = {stage.name: stage for stage in QwenImageFamily().stages(task)}[name]
    return _STAGE_TYPES[name](task, spec, components, device, latent_geometry(configs))


def resized_input_image(pipe: QwenImageEditPipeline, request: QwenImageEditRequest):
    """The Edit input image resized as the pipeline does: about one megapixel, its aspect ratio kept."""
    try:
        image = load_image(str(request.image))
    except (OSError, ValueError) as exc:
        raise RequestError(f"cannot read the input image {request.image}: {exc}") from exc
    problem = edit_aspect_problem(request.image, image.width, image.height)
    if problem:
        raise RequestError(problem)
    width, height, _ = calculate_dimensions(EDIT_IMAGE_AREA, image.width / image.height)
    return pipe.image_processor.resize(image, height, width)
