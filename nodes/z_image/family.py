"""Z-Image family declaration: tasks, stages, components, request parameters and shape symbols.

Only data and pydantic here (no torch import): ``engine validate`` reads this in milliseconds.
The runtime side (sources, stage execution, output writing) lives in the sibling modules and is
imported only when a worker needs it.

Sizes follow diffusers' ZImagePipeline:
- prompt embeddings are the text encoder's second-to-last hidden states of the real tokens of the
  chat-templated prompt (the pipeline drops the padding with the attention mask): their length is a variable
  dimension bounded by the pipeline's ``max_sequence_length``;
- latents are ``[batch, latent_channels, height / s, width / s]`` float32 for a VAE that downsamples s times
  (8 in Z-Image), unpacked: the transformer patches them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from engine.stages import (MODEL_DTYPE, CachePart, ComponentSpec, ConfigProblem, Configs, ModelFamily, RequestParams,
                           RequestProblem, StageSpec, TensorSpec)
from nodes.z_image.geometry import config_problems, latent_geometry, request_problems

#: Chat-templated prompts past this many tokens are cut off by ZImagePipeline (its ``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 512

_PROMPT = ("batch", "prompt_len", "text_dim")

TEXT_ENCODE = StageSpec(
    "text_encode",
    components=("tokenizer", "text_encoder"),
    outputs=(
        TensorSpec("prompt_embeds", MODEL_DTYPE, _PROMPT, variable=(1,)),
        TensorSpec("negative_prompt_embeds", MODEL_DTYPE, _PROMPT, optional=True, variable=(1,)),
    ),
    description="Qwen3 second-to-last hidden states of the prompt's real tokens (and of the negative prompt with CFG)",
    cache_key=("prompt", "negative_prompt", "guidance_scale"),
    cache_parts=(CachePart("prompt", ("prompt",), ("prompt_embeds",)),
                 CachePart("negative_prompt", ("negative_prompt",), ("negative_prompt_embeds",))),
)
DENOISE = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=("prompt_embeds", "negative_prompt_embeds"),
    outputs=(TensorSpec("latents", "float32", ("batch", "z_dim", "latent_h", "latent_w")),),
    description="single-stream DiT flow-matching loop, with classifier-free guidance when guidance_scale > 0",
    step_cached=True,
)
VAE_DECODE = StageSpec(
    "vae_decode",
    components=("vae_decoder",),
    inputs=("latents",),
    outputs=(TensorSpec("image", "float32", ("batch", "height", "width", 3)),),
    description="VAE decoder to an RGB image in [0, 1]",
    exportable=True,
)

_STAGES = (TEXT_ENCODE, DENOISE, VAE_DECODE)

_COMPONENTS = {
    "tokenizer": ComponentSpec("tokenizer", "tokenizer", weights=False),
    "text_encoder": ComponentSpec("text_encoder", "text_encoder"),
    "transformer": ComponentSpec("transformer", "transformer"),
    "scheduler": ComponentSpec("scheduler", "scheduler", weights=False),
    "vae_decoder": ComponentSpec("vae_decoder", "vae", prefixes=("decoder.", "post_quant_conv.")),
}


class ZImageRequest(RequestParams):
    """A Z-Image text-to-image request. The defaults are Z-Image-Turbo's (9 steps, no guidance)."""

    size_fields: ClassVar[tuple[str, ...]] = ("height", "width")

    prompt: str = Field(min_length=1, description="What the image shows.")
    negative_prompt: str = Field("", description="What the image should not show (used when guidance_scale > 0).")
    height: int = Field(1024, ge=16, le=4096, multiple_of=16, description="Image height in pixels, a multiple of 16.")
    width: int = Field(1024, ge=16, le=4096, multiple_of=16, description="Image width in pixels, a multiple of 16.")
    steps: int = Field(9, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Classifier-free guidance scale, pos + scale * (pos - neg); 0 turns it off (Turbo's default).",
    )
    cfg_normalization: float = Field(
        0.0, ge=0.0, le=100.0,
        description="With guidance: cap the guided prediction's norm at this multiple of the conditional one's; 0 "
                    "turns it off (diffusers' cfg_normalization=True is 1).",
    )
    cfg_truncation: float = Field(
        1.0, ge=0.0, le=100.0,
        description="With guidance: steps whose normalised time (1000 - t) / 1000 exceeds this run without it.",
    )

    @property
    def guidance(self) -> bool:
        """Whether the request runs classifier-free guidance (the pipeline's ``do_classifier_free_guidance``)."""
        return self.guidance_scale > 0


class ZImageFamily(ModelFamily):
    name = "z_image"
    tasks = ("t2i",)
    presets = ("tiny",)

    def stages(self, task: str) -> tuple[StageSpec, ...]:
        return _STAGES

    def components(self, task: str) -> dict[str, ComponentSpec]:
        return dict(_COMPONENTS)

    def request_type(self, task: str) -> type[RequestParams]:
        return ZImageRequest

    def check_configs(self, task: str, configs: Configs) -> list[ConfigProblem]:
        return config_problems(configs)

    def request_problems(self, task: str, configs: Configs, request: RequestParams) -> list[RequestProblem]:
        assert isinstance(request, ZImageRequest)
        return request_problems(latent_geometry(configs), request.height, request.width)

    def shape_symbols(self, task: str, configs: Configs, request: RequestParams) -> dict[str, int]:
        assert isinstance(request, ZImageRequest)
        geometry = latent_geometry(configs)
        return {
            "batch": 1,
            "text_dim": int(configs["text_encoder"]["hidden_size"]),
            "prompt_len": MAX_SEQUENCE_LENGTH,
            "z_dim": geometry.channels,
            "height": request.height,
            "width": request.width,
            "latent_h": request.height // geometry.scale,
            "latent_w": request.width // geometry.scale,
        }

    def split_refusal(self, kind: str) -> str:
        if kind == "cfg":
            return ("ZImagePipeline computes the conditional and unconditional predictions as one padded batch, which "
                    "a branch per rank would not reproduce exactly")
        return super().split_refusal(kind)

    def find_source(self, task: str, path: str) -> Path | None:
        from nodes.z_image.sources import find_source

        return find_source(task, path)

    # -- runtime ------------------------------------------------------------------------------------------

    def resolve_source(self, task: str, path: str) -> Path:
        from nodes.z_image.sources import resolve_source

        return resolve_source(task, path)

    def load_components(self, task, names, source, device, dtype):
        from nodes.z_image.loading import load_components

        return load_components(names, source, device, dtype)

    def build_stage(self, task, name, components, device, dtype, configs):
        from nodes.z_image.stages import build_stage

        return build_stage(name, components, device, configs)

    def export_recipes(self, task, stage):
        from nodes.z_image.exports import export_recipes

        return export_recipes(stage)

    def write_output(self, request, outputs, out_dir, stem, *, meta=None, save_frames=False):
        from engine.models.outputs import write_image

        return write_image(request, outputs, out_dir, stem, meta=meta, save_frames=save_frames)
