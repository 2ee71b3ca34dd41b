"""The Wan stages: the diffusers WanPipeline / WanImageToVideoPipeline, cut at the edges of the graph.

Each stage holds a diffusers pipeline built with only the components its node loaded (the others None)
and calls the pipeline's own methods where one exists (``encode_prompt``, ``encode_image``,
``prepare_latents``), so a disaggregated run computes exactly what the monolithic pipeline computes.
Where the pipeline's ``__call__`` does the work inline (the I2V conditioning, the denoising loop, the
decode) the code below follows it step by step. Stages run under ``torch.no_grad`` like ``__call__``.
With two experts (Wan2.2 A14B) the loop is cut at the boundary timestep: the high-noise stage hands the
low-noise one its latents and the scheduler's state (:mod:`nodes.wan.handoff`). Wan2.2 TI2V-5B's image to video
(task ``ti2v``, the pipeline's ``expand_timesteps`` path) has stages of its own under the shared names
``vae_encode`` and ``denoise``: the image's latent is the first latent frame, put back in place at every step.

Tensors leaving a stage are the outputs declared in :mod:`nodes.wan.family`, in the declared dtypes
(``model``: the node's dtype). Casting there is exact: the pipeline casts the same tensors to the
transformer's dtype before using them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.utils import load_image
from diffusers.video_processor import VideoProcessor

from engine.errors import ModelError, RequestError
from engine.parallel import SINGLE, Split
from engine.models.loading import torch_dtype
from engine.preview.picture import flow_x0, offer
from engine.stages import Configs, LoadedComponents, ProgressFn, Stage
from engine.stepcache.cache import StepCache
from engine.stream.sink import emit, stream_sink
from nodes.wan.family import TEXT_LEN, WanExpertsRequest, WanFamily, WanImageRequest, WanRequest
from nodes.wan.geometry import LatentGeometry, latent_geometry, request_problems
from nodes.wan.handoff import check_scheduler, restore_scheduler_state, scheduler_state
from nodes.wan.parallel import split_sequence
from nodes.wan.preview import projection
from nodes.wan.stepcache import WanBlocks, teacache_profile
from nodes.wan.streaming import decode_by_frame, decodes_by_frame


def build_stage(task: str, name: str, components: LoadedComponents, device: str, dtype: str, configs: Configs) -> Stage:
    """The stage ``name`` of ``task`` over ``components`` (which must hold the stage's components)."""
    spec = next((s for s in WanFamily().stages(task) if s.name == name), None)
    if spec is None:
        names = ", ".join(s.name for s in WanFamily().stages(task))
        raise ModelError(f"wan {task} has no stage {name!r}; stages: {names}")
    missing = [c for c in spec.components if c not in components.objects]
    if missing:
        raise ModelError(f"stage {name!r} needs components {missing}, which this node did not load")
    held = {c: components.objects[c] for c in spec.components}
    stage_type = _TASK_STAGES.get(task, {}).get(name, _STAGES[name])
    stage = stage_type(torch.device(device), torch_dtype(dtype), latent_geometry(configs), **held)
    stage.spec = spec
    return stage


def _read_image(path: Path):
    """The request's first frame as an RGB PIL image, exactly as ``diffusers.utils.load_image`` reads it."""
    try:
        return load_image(str(path))
    except (OSError, ValueError) as exc:
        raise RequestError(f"cannot read image {path}: {exc}") from exc


def _latent_stats(vae, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and 1 / std, shaped to broadcast over [B, C, F, H, W]."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, inv_std


class WanStage(Stage):
    """A stage on a device, handing over tensors in a dtype, for a model of a latent geometry."""

    def __init__(self, device: torch.device, dtype: torch.dtype, geometry: LatentGeometry):
        self.device, self.dtype, self.geometry = device, dtype, geometry


class TextEncode(WanStage):
    """umT5 embeddings of the prompt and, with guidance on, of the negative prompt."""

    def __init__(self, device, dtype, geometry, *, tokenizer, text_encoder):
        super().__init__(device, dtype, geometry)
        self.pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)

    def run(self, request: WanRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        # The prompt, and the negative prompt only with guidance on, as in __call__.
        outputs: dict[str, torch.Tensor] = {}
        for part in self.parts(request):
            outputs.update(self.run_part(part, request))
        return outputs

    def parts(self, request: WanRequest) -> tuple[str, ...]:
        return ("prompt", "negative_prompt") if request.guidance_scale > 1.0 else ("prompt",)

    @torch.no_grad()
    def run_part(self, part: str, request: WanRequest) -> dict[str, torch.Tensor]:
        # 1. The pipeline's encode_prompt (the I2V pipeline's is a copy) encodes the prompt and the negative prompt
        #    (None as "") in two separate calls of _get_t5_prompt_embeds: prompt cleaning, 512-token padding, zeros
        #    past the real tokens. One call here is one of those: the same embeddings.
        text = request.prompt if part == "prompt" else request.negative_prompt or ""
        embeds, _ = self.pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                            device=self.device)
        # 2. Hand over in the node's dtype, the one __call__ casts to before the transformer.
        return {f"{part}_embeds": embeds.to(self.dtype)}


class ImageEncode(WanStage):
    """CLIP penultimate hidden states of the first frame (I2V)."""

    def __init__(self, device, dtype, geometry, *, image_processor, image_encoder):
        super().__init__(device, dtype, geometry)
        self.pipe = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, vae=None, scheduler=None,
            image_processor=image_processor, image_encoder=image_encoder,
        )

    @torch.no_grad()
    def run(self, request: WanImageRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        # 1. The pipeline's encode_image, on the image as loaded from the file.
        image_embeds = self.pipe.encode_image(_read_image(request.image), self.device)
        # 2. In the node's dtype, as __call__ casts it for the transformer.
        return {"image_embeds": image_embeds.to(self.dtype)}


class VaeEncode(WanStage):
    """The I2V condition: a mask of the frames the image fixes and the VAE latent of the image video."""

    def __init__(self, device, dtype, geometry, *, vae_encoder):
        super().__init__(device, dtype, geometry)
        self.vae = vae_encoder
        self.video_processor = VideoProcessor(vae_scale_factor=geometry.s_scale)

    @torch.no_grad()
    def run(self, request: WanImageRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        # Follows WanImageToVideoPipeline.__call__ step 5 and prepare_latents, less the noise, which the
        # denoise stage draws.
        num_frames, height, width = request.num_frames, request.height, request.width
        t_scale, s_scale = self.geometry.t_scale, self.geometry.s_scale
        latent_h, latent_w = height // s_scale, width // s_scale

        # 1. The first frame followed by num_frames - 1 black frames, encoded.
        image = self._first_frame(request)
        video_condition = torch.cat(
            [image, image.new_zeros(image.shape[0], image.shape[1], num_frames - 1, height, width)], dim=2
        )
        latent_condition = self._encode(video_condition)

        # 2. The mask: 1 on the first frame only. The first frame is repeated t_scale times so that every
        #    latent frame covers t_scale mask frames, then folded into t_scale channels.
        mask = torch.ones(1, 1, num_frames, latent_h, latent_w)
        mask[:, :, list(range(1, num_frames))] = 0
        first_frame_mask = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=t_scale)
        mask = torch.concat([first_frame_mask, mask[:, :, 1:, :]], dim=2)
        mask = mask.view(1, -1, t_scale, latent_h, latent_w).transpose(1, 2).to(latent_condition.device)

        # 3. Mask channels then latent channels, in the node's dtype (__call__ casts the concatenation of
        #    latents and condition to the transformer's dtype; the cast is elementwise, so doing it here is exact).
        return {"condition": torch.concat([mask, latent_condition], dim=1).to(self.dtype)}

    def _first_frame(self, request: WanImageRequest) -> torch.Tensor:
        """The image resized to the request and scaled to [-1, 1], float32, as a one-frame video [B, C, 1, H, W]."""
        image = _read_image(request.image)
        image = self.video_processor.preprocess(image, height=request.height, width=request.width)
        return image.to(self.device, dtype=torch.float32).unsqueeze(2)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """The video's latent: the posterior's mode, float32, normalised with the VAE's latent statistics."""
        latents_mean, latents_std = _latent_stats(self.vae, torch.float32, self.device)
        latent = retrieve_latents(self.vae.encode(video.to(self.device, self.vae.dtype)), sample_mode="argmax")
        return (latent.to(self.device, torch.float32) - latents_mean) * latents_std


class VaeEncodeFirstFrame(VaeEncode):
    """Wan2.2 TI2V-5B image to video: the latent of the image alone, which stands as the first latent frame."""

    @torch.no_grad()
    def run(self, request: WanImageRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        # prepare_latents with expand_timesteps: the one frame is the video encoded. Float32 as encoded: the loop
        # mixes it with the float32 latents, and only the mixture is cast to the transformer's dtype.
        return {"condition": self._encode(self._first_frame(request))}


@dataclass
class _Loop:
    """What every step of one request's denoising loop reads, whichever expert takes it."""

    scheduler: UniPCMultistepScheduler
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None  # None: no guidance
    condition: torch.Tensor | None  # I2V: first-frame mask and image latent; TI2V-5B: the first frame's latent
    image_kwargs: dict[str, torch.Tensor]  # Wan2.1 I2V: the CLIP image tokens
    # Wan2.2 TI2V-5B (expand_timesteps): [1, 1, F, H, W] per latent, 0 where the image's latent stands (none in text
    # to video), else None; and its values at the transformer's tokens, [F, H / patch, W / patch]
    latent_mask: torch.Tensor | None
    token_mask: torch.Tensor | None
    step_cache: StepCache  # this request's, for this expert's transformer


class Denoise(WanStage):
    """The DiT denoising loop with classifier-free guidance, from freshly drawn noise to clean latents."""

    def __init__(self, device, dtype, geometry, *, transformer, scheduler):
        super().__init__(device, dtype, geometry)
        self.transformer, self.scheduler = transformer, scheduler
        # The pipeline without text encoder and VAE, drawing noise at the model's VAE strides (rather than the
        # Wan2.1 ones it assumes without a VAE).
        self.pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
        self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial = geometry.t_scale, geometry.s_scale
        self.parallel = SINGLE
        self.preview = projection(geometry.channels)

    def split(self, split: Split) -> None:
        self.parallel = split
        if split.ulysses > 1:
            split_sequence(self.transformer, split)

    @torch.no_grad()
    def run(self, request: WanRequest, inputs: Mapping[str, torch.Tensor], progress: ProgressFn) -> dict[str, torch.Tensor]:
        loop = self._prepare(request, inputs)
        latents = self._steps(loop, self._noise(request), range(len(loop.timesteps)), request.guidance_scale, progress)
        return {"latents": self._clean(loop, latents)}

    def _scheduler(self, request: WanRequest) -> UniPCMultistepScheduler:
        # A fresh scheduler per request: its multistep state must not carry over between requests, and
        # flow_shift may differ per request (the diffusers examples rebuild it with from_config too).
        shift = {} if request.flow_shift is None else {"flow_shift": request.flow_shift}
        return type(self.scheduler).from_config(self.scheduler.config, **shift)

    def _prepare(self, request: WanRequest, inputs: Mapping[str, torch.Tensor]) -> _Loop:
        transformer_dtype = self.transformer.dtype
        # A size off the model's token grid, which the plan refuses too (a request made elsewhere may reach a worker
        # unchecked): the pipelines would round it down, to another video than the one requested.
        problems = request_problems(self.geometry, request.height, request.width, request.num_frames)
        if problems:
            raise RequestError("; ".join(map(str, problems)))
        latent_mask = self._latent_mask(request)

        # 1. Conditioning in the transformer's dtype, as __call__ casts it before the loop.
        guidance = request.guidance_scale > 1.0
        prompt_embeds = inputs["prompt_embeds"].to(self.device, transformer_dtype)
        negative_prompt_embeds = inputs["negative_prompt_embeds"].to(self.device, transformer_dtype) if guidance else None
        image_embeds = inputs.get("image_embeds")
        condition = inputs.get("condition")
        image_kwargs = {}
        if image_embeds is not None:
            image_kwargs["encoder_hidden_states_image"] = image_embeds.to(self.device, transformer_dtype)
        if condition is not None:
            condition = condition.to(self.device)

        # 2. Timesteps. Starting at index 0, as WanPipeline sets it, spares the scheduler a device sync to find
        #    the first step.
        scheduler = self._scheduler(request)
        scheduler.set_timesteps(request.steps, device=self.device)
        scheduler.set_begin_index(0)
        token_mask = None if latent_mask is None else self._token_values(latent_mask)
        profile = teacache_profile(self.transformer.config, self.spec, request.height, request.width)
        # One skip decision for the whole sequence: with Ulysses each rank measures its tokens, and the sums are added.
        step_cache = StepCache.open(request.cache, WanBlocks(self.transformer, profile), reduce=self.parallel.sum_over_tokens)
        return _Loop(scheduler, scheduler.timesteps, prompt_embeds, negative_prompt_embeds, condition, image_kwargs,
                     latent_mask, token_mask, step_cache)

    def _latent_mask(self, request: WanRequest) -> torch.Tensor | None:
        """With expand_timesteps, the mask the pipelines scale the step's timestep by, [1, 1, F, H, W]: all ones for
        text to video. None without expand_timesteps."""
        if not self.geometry.expand_timesteps:
            return None
        latent_frames = (request.num_frames - 1) // self.geometry.t_scale + 1
        return torch.ones(1, 1, latent_frames, request.height // self.geometry.s_scale,
                          request.width // self.geometry.s_scale, dtype=torch.float32, device=self.device)

    def _token_values(self, latent_mask: torch.Tensor) -> torch.Tensor:
        """The mask at each transformer token (the first latent pixel of its patch), [F, H / patch, W / patch]."""
        _, patch_h, patch_w = self.transformer.config.patch_size
        return latent_mask[0, 0, :, ::patch_h, ::patch_w]

    def _model_input(self, loop: _Loop, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer denoises: the latents, and for I2V the condition channels next to them."""
        return latents if loop.condition is None else torch.cat([latents, loop.condition], dim=1)

    def _clean(self, loop: _Loop, latents: torch.Tensor) -> torch.Tensor:
        """The latents the stage hands over once the loop has ended: the loop's own."""
        return latents

    def _noise(self, request: WanRequest) -> torch.Tensor:
        # The initial noise, float32, from a CPU generator seeded with the request's seed: the same noise on every
        # device, and what the pipeline draws given generator=torch.Generator().manual_seed(seed).
        return self.pipe.prepare_latents(
            1,
            self.geometry.channels,
            request.height,
            request.width,
            request.num_frames,
            torch.float32,
            self.device,
            torch.Generator(device="cpu").manual_seed(request.seed),
        )

    def _steps(self, loop: _Loop, latents: torch.Tensor, indices: Iterable[int], guidance_scale: float,
               progress: ProgressFn) -> torch.Tensor:
        """The steps ``indices`` of the denoising loop of __call__."""
        transformer_dtype = self.transformer.dtype
        for i in indices:
            t = loop.timesteps[i]
            latent_model_input = self._model_input(loop, latents).to(transformer_dtype)
            if loop.token_mask is None:
                timestep = t.expand(latents.shape[0])
            else:  # expand_timesteps: [batch, tokens]
                timestep = (loop.token_mask * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)

            def predict(context: str, embeds: torch.Tensor) -> torch.Tensor:
                with self.transformer.cache_context(context):
                    return loop.step_cache.run(context, i, len(loop.timesteps), lambda: self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=embeds,
                        return_dict=False,
                        **loop.image_kwargs,
                    )[0])

            # The conditional and unconditional predictions (on two ranks at once with CFG parallel).
            branches = [lambda: predict("cond", loop.prompt_embeds)]
            if loop.negative_prompt_embeds is not None:
                branches.append(lambda: predict("uncond", loop.negative_prompt_embeds))
            noise_pred, *uncond = self.parallel.predict(branches)
            if uncond:
                noise_pred = uncond[0] + guidance_scale * (noise_pred - uncond[0])

            # A preview of the clean latents this step predicts, when one is due (engine.preview).
            offer(i + 1, len(loop.timesteps), lambda: self._clean(loop, flow_x0(latents, noise_pred, loop.scheduler.sigmas[i]))[0],
                  self.preview)
            # x_t -> x_t-1
            latents = loop.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            progress(i + 1, len(loop.timesteps))
        return latents


class DenoiseFirstFrame(Denoise):
    """Wan2.2 TI2V-5B image to video: the image's latent stands as the first latent frame at every step, at timestep
    0; the loop denoises the other frames, and hands over the video's latents with that frame in place."""

    def _latent_mask(self, request: WanImageRequest) -> torch.Tensor:
        # prepare_latents' first_frame_mask: 0 on the first latent frame (task ti2v runs only with expand_timesteps).
        mask = super()._latent_mask(request)
        mask[:, :, 0] = 0
        return mask

    def _model_input(self, loop: _Loop, latents: torch.Tensor) -> torch.Tensor:
        # The condition's one frame where the mask is 0, the latents where it is 1 (in float32, as __call__ mixes).
        return (1 - loop.latent_mask) * loop.condition + loop.latent_mask * latents

    def _clean(self, loop: _Loop, latents: torch.Tensor) -> torch.Tensor:
        # As __call__ does before decoding: the image's latent back in the first frame.
        return self._model_input(loop, latents)


class DenoiseHighNoise(Denoise):
    """Wan2.2 A14B, the high-noise expert (``transformer``): from fresh noise through the steps whose timestep is
    at least the boundary; hands over the latents and the scheduler's state."""

    def __init__(self, device, dtype, geometry, *, transformer, scheduler):
        super().__init__(device, dtype, geometry, transformer=transformer, scheduler=scheduler)
        check_scheduler(scheduler)

    @torch.no_grad()
    def run(self, request: WanExpertsRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        loop = self._prepare(request, inputs)
        high, _ = expert_steps(loop, request)
        latents = self._steps(loop, self._noise(request), high, request.guidance_scale, progress)
        return {"boundary_latents": latents, **scheduler_state(loop.scheduler)}


class DenoiseLowNoise(Denoise):
    """Wan2.2 A14B, the low-noise expert (``transformer_2``): from the handed-over latents and scheduler state
    through the remaining steps, with ``guidance_scale_2``."""

    def __init__(self, device, dtype, geometry, *, transformer_2, scheduler):
        super().__init__(device, dtype, geometry, transformer=transformer_2, scheduler=scheduler)
        check_scheduler(scheduler)

    @torch.no_grad()
    def run(self, request: WanExpertsRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        loop = self._prepare(request, inputs)
        high, low = expert_steps(loop, request)
        restore_scheduler_state(loop.scheduler, inputs, self.device)
        if (loop.scheduler.step_index or 0) != len(high):
            raise ModelError(f"the high-noise expert handed over after step {loop.scheduler.step_index}; with "
                             f"boundary_ratio {request.boundary_ratio} it takes {len(high)} of {request.steps} steps")
        latents = inputs["boundary_latents"].to(self.device)
        return {"latents": self._steps(loop, latents, low, request.low_noise_guidance_scale, progress)}


def expert_steps(loop: _Loop, request: WanExpertsRequest) -> tuple[range, range]:
    """The step indices of the high-noise and the low-noise expert: timesteps at least
    ``boundary_ratio * num_train_timesteps``, and the rest (the timesteps decrease)."""
    boundary = request.boundary_ratio * loop.scheduler.config.num_train_timesteps
    high = sum(1 for t in loop.timesteps if t >= boundary)
    return range(high), range(high, len(loop.timesteps))


class VaeDecode(WanStage):
    """VAE decoder: clean latents to RGB frames in [0, 1], [batch, frames, height, width, 3]."""

    def __init__(self, device, dtype, geometry, *, vae_decoder):
        super().__init__(device, dtype, geometry)
        self.vae = vae_decoder
        self.video_processor = VideoProcessor(vae_scale_factor=geometry.s_scale)

    @torch.no_grad()
    def run(self, request: WanRequest, inputs, progress: ProgressFn) -> dict[str, torch.Tensor]:
        # 1. Undo the latent normalisation in the VAE's dtype, as __call__ does before decoding.
        latents = inputs["latents"].to(self.device, dtype=self.vae.dtype)
        latents_mean, latents_std = _latent_stats(self.vae, latents.dtype, latents.device)
        latents = latents / latents_std + latents_mean

        # 2. Decode, then map [-1, 1] to [0, 1] like the pipeline's postprocessing ("pt" is "np" before the
        #    NumPy conversion: [B, F, C, H, W]); channels last as the pipeline's frames.
        #    Someone listening for frames as they are made (engine.stream) gets each latent frame's as it is
        #    decoded, the same frames the whole decode gives (nodes.wan.streaming).
        sink = stream_sink()
        if sink is None or not decodes_by_frame(self.vae):
            frames = self._frames(self.vae.decode(latents, return_dict=False)[0])
            emit(frames)
            return {"frames": frames}
        chunks = []
        for video in decode_by_frame(self.vae, latents):
            chunks.append(self._frames(video))
            sink(chunks[-1])
        return {"frames": torch.cat(chunks, 1)}

    def _frames(self, video: torch.Tensor) -> torch.Tensor:
        frames = self.video_processor.postprocess_video(video, output_type="pt")
        return frames.permute(0, 1, 3, 4, 2).float().contiguous()


_STAGES = {
    "text_encode": TextEncode,
    "image_encode": ImageEncode,
    "vae_encode": VaeEncode,
    "denoise": Denoise,
    "denoise_high": DenoiseHighNoise,
    "denoise_low": DenoiseLowNoise,
    "vae_decode": VaeDecode,
}
#: The stages of a task that go by a shared name but run otherwise.
_TASK_STAGES = {"ti2v": {"vae_encode": VaeEncodeFirstFrame, "denoise": DenoiseFirstFrame}}
