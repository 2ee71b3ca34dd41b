"""Qwen-Image family declaration: tasks, stages, components, request parameters and shape symbols.

Only data and pydantic here (no torch import): ``engine validate`` reads this in milliseconds.
The runtime side (sources, loading, stage execution, output writing) lives in the sibling modules and is
imported only when a worker needs it.

Sizes follow diffusers' QwenImagePipeline / QwenImageEditPipeline:
- prompt embeddings hold the real token count (after the template's system prefix is dropped), never
  padded: their length is a variable dimension bounded by what the pipeline admits;
- latents are packed 2x2 patches, ``[batch, (height / 2s) * (width / 2s), 4 * z_dim]`` for a VAE that
  downsamples s times (8 in Qwen-Image: 16-pixel tokens), in the model dtype (the pipeline's scheduler
  hands them back in the dtype of the prompt embeddings);
- Edit encodes its input image at about one megapixel with the input's aspect ratio
  (``calculate_dimensions`` in the Edit pipeline), whatever the output size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, model_validator

from engine.stages import (CHECK_FILES, MODEL_DTYPE, CachePart, ComponentSpec, ConfigProblem, Configs, ModelFamily,
                           RequestParams, RequestProblem, StageSpec, TensorSpec)
from nodes.qwen_image.geometry import config_problems, latent_geometry, request_problems

#: Prompt embeddings past this many tokens are cut off by QwenImagePipeline (its ``max_sequence_length``).
T2I_MAX_SEQUENCE_LENGTH = 512
#: Prompt embedding tokens an Edit request may have besides its image's vision tokens. QwenImageEditPipeline
#: does not truncate; a request past the bound is refused by text_encode.
EDIT_MAX_TEXT_TOKENS = 1024
#: Pixel area the Edit pipeline resizes its input image to before encoding it.
EDIT_IMAGE_AREA = 1024 * 1024
#: Widest input aspect ratio (long side / short side) an Edit request accepts.
EDIT_MAX_ASPECT = 4.0

_PROMPT = ("batch", "prompt_len", "text_dim")
_MASK = ("batch", "prompt_len")
_PACKED = ("batch", "latent_tokens", "packed_dim")

TEXT_ENCODE_OUTPUTS = (
    TensorSpec("prompt_embeds", MODEL_DTYPE, _PROMPT, variable=(1,)),
    TensorSpec("prompt_embeds_mask", "int64", _MASK, variable=(1,)),
    TensorSpec("negative_prompt_embeds", MODEL_DTYPE, _PROMPT, optional=True, variable=(1,)),
    TensorSpec("negative_prompt_embeds_mask", "int64", _MASK, optional=True, variable=(1,)),
)
_PROMPT_INPUTS = tuple(spec.name for spec in TEXT_ENCODE_OUTPUTS)

TEXT_ENCODE_T2I = StageSpec(
    "text_encode",
    components=("tokenizer", "text_encoder"),
    outputs=TEXT_ENCODE_OUTPUTS,
    description="Qwen2.5-VL last hidden states of the prompt (and of the negative prompt with true CFG)",
    cache_key=("prompt", "negative_prompt", "true_cfg_scale"),
    cache_parts=(CachePart("prompt", ("prompt",), ("prompt_embeds", "prompt_embeds_mask")),
                 CachePart("negative_prompt", ("negative_prompt",),
                           ("negative_prompt_embeds", "negative_prompt_embeds_mask"))),
)
TEXT_ENCODE_EDIT = StageSpec(
    "text_encode",
    components=("processor", "text_encoder"),
    outputs=TEXT_ENCODE_OUTPUTS,
    description="Qwen2.5-VL last hidden states of the prompt with the input image (and of the negative prompt)",
    reads=("image",),
)
VAE_ENCODE = StageSpec(
    "vae_encode",
    components=("vae_encoder",),
    outputs=(
        TensorSpec(
            "image_latents", MODEL_DTYPE, ("batch", "z_dim", 1, "image_latent_h", "image_latent_w"), variable=(3, 4)
        ),
    ),
    description="normalised VAE latent (distribution mode) of the input image at about one megapixel",
    reads=("image",),
    exportable=True,
)
DENOISE_T2I = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=_PROMPT_INPUTS,
    outputs=(TensorSpec("latents", MODEL_DTYPE, _PACKED),),
    description="MMDiT flow-matching loop with true classifier-free guidance",
    splits=("cfg",),  # its joint text-image attention has no sequence split here
    step_cached=True,
)
DENOISE_EDIT = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=(*_PROMPT_INPUTS, "image_latents"),
    outputs=(TensorSpec("latents", MODEL_DTYPE, _PACKED),),
    description="MMDiT flow-matching loop with true classifier-free guidance, conditioned on the image latents",
    splits=("cfg",),  # its joint text-image attention has no sequence split here
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

_STAGES = {
    "t2i": (TEXT_ENCODE_T2I, DENOISE_T2I, VAE_DECODE),
    "edit": (TEXT_ENCODE_EDIT, VAE_ENCODE, DENOISE_EDIT, VAE_DECODE),
}

_COMPONENTS = {
    "tokenizer": ComponentSpec("tokenizer", "tokenizer", weights=False),
    "processor": ComponentSpec("processor", "processor", weights=False),
    "text_encoder": ComponentSpec("text_encoder", "text_encoder"),
    "transformer": ComponentSpec("transformer", "transformer"),
    "scheduler": ComponentSpec("scheduler", "scheduler", weights=False),
    "vae_encoder": ComponentSpec("vae_encoder", "vae", prefixes=("encoder.", "quant_conv.")),
    "vae_decoder": ComponentSpec("vae_decoder", "vae", prefixes=("decoder.", "post_quant_conv.")),
}


class QwenImageRequest(RequestParams):
    """A Qwen-Image text-to-image request."""

    size_fields: ClassVar[tuple[str, ...]] = ("height", "width")

    prompt: str = Field(min_length=1, description="What the image shows.")
    negative_prompt: str | None = Field(
        None, description="What the image should not show; true CFG runs only when given and true_cfg_scale > 1."
    )
    height: int = Field(1024, ge=16, le=4096, multiple_of=16, description="Image height in pixels, a multiple of 16.")
    width: int = Field(1024, ge=16, le=4096, multiple_of=16, description="Image width in pixels, a multiple of 16.")
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    true_cfg_scale: float = Field(
        4.0, ge=0.0, le=100.0,
        description="True classifier-free guidance scale; <= 1 (or no negative prompt) turns it off.",
    )

    @property
    def true_cfg(self) -> bool:
        """Whether the request runs true CFG (the pipeline's ``do_true_cfg``)."""
        return self.true_cfg_scale > 1 and self.negative_prompt is not None


class QwenImageEditRequest(QwenImageRequest):
    """A Qwen-Image Edit request: a text request plus the image to edit.

    The output is ``height`` x ``width`` as for text-to-image (QwenImageEditPipeline would default it to the
    input's aspect ratio at about one megapixel); the input is encoded at that aspect ratio in any case.
    """

    image: Path = Field(
        description=f"Path of the image to edit (PNG/JPEG), aspect ratio at most {EDIT_MAX_ASPECT:g}:1 either way."
    )

    @model_validator(mode="after")
    def _image_fits(self, info: ValidationInfo) -> "QwenImageEditRequest":
        # Where the request is made (validate, plan, run, a service's upload); the stage holds it to the same rule.
        if info.context == CHECK_FILES:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(self.image) as image:
                    size = image.size
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise ValueError(f"image {self.image} cannot be read as an image: {exc}") from None
            problem = edit_aspect_problem(self.image, *size)
            if problem:
                raise ValueError(problem)
        return self


def edit_aspect_problem(path: Path, width: int, height: int) -> str | None:
    """Why the Edit pipeline would not take an input image of ``width`` x ``height``; None if it does."""
    aspect = max(width, height) / min(width, height)
    if aspect > EDIT_MAX_ASPECT:
        return f"input image {path} is {width}x{height} (aspect {aspect:.2f}); at most {EDIT_MAX_ASPECT:g}:1 is accepted"
    return None


def edit_image_size_bounds() -> tuple[int, int]:
    """Largest side and largest area (pixels) of the Edit pipeline's resized input image.

    ``calculate_dimensions`` sets ``width = round(sqrt(area * ratio) / 32) * 32`` and ``height`` likewise
    from ``area / ratio``; each side is off by at most 16 from the exact value.
    """
    long_side = math.sqrt(EDIT_IMAGE_AREA * EDIT_MAX_ASPECT)
    short_side = math.sqrt(EDIT_IMAGE_AREA / EDIT_MAX_ASPECT)
    max_side = round(long_side / 32) * 32
    max_area = EDIT_IMAGE_AREA + 16 * math.ceil(long_side + short_side) + 16 * 16
    return max_side, max_area


def edit_prompt_len_bound(vision_config: Mapping[str, Any]) -> int:
    """Most prompt embedding tokens an Edit request may produce: text tokens plus the input image's
    vision tokens, which the processor counts on each side rounded to ``patch_size * spatial_merge_size``
    (moving it by at most half that)."""
    max_side, max_area = edit_image_size_bounds()
    factor = int(vision_config["patch_size"]) * int(vision_config["spatial_merge_size"])
    half, short_side = factor / 2, math.ceil(max_area / max_side)
    vision_tokens = math.ceil((max_area + half * (max_side + short_side) + half**2) / factor**2)
    return EDIT_MAX_TEXT_TOKENS + vision_tokens


def text_hidden_size(config: Mapping[str, Any]) -> int:
    """Hidden size of a Qwen2.5-VL text encoder config (nested under ``text_config`` in transformers 5)."""
    return int((config.get("text_config") or config)["hidden_size"])


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    tasks = ("t2i", "edit")
    presets = ("tiny",)

    def stages(self, task: str) -> tuple[StageSpec, ...]:
        return _STAGES[task]

    def components(self, task: str) -> dict[str, ComponentSpec]:
        names = dict.fromkeys(name for stage in _STAGES[task] for name in stage.components)
        return {name: _COMPONENTS[name] for name in names}

    def request_type(self, task: str) -> type[RequestParams]:
        return QwenImageEditRequest if task == "edit" else QwenImageRequest

    def check_configs(self, task: str, configs: Configs) -> list[ConfigProblem]:
        return config_problems(configs)

    def request_problems(self, task: str, configs: Configs, request: RequestParams) -> list[RequestProblem]:
        assert isinstance(request, QwenImageRequest)
        return request_problems(latent_geometry(configs), request.height, request.width)

    def shape_symbols(self, task: str, configs: Configs, request: RequestParams) -> dict[str, int]:
        assert isinstance(request, QwenImageRequest)
        geometry = latent_geometry(configs)
        patch = geometry.token_pixels
        symbols = {
            "batch": 1,
            "text_dim": text_hidden_size(configs["text_encoder"]),
            "z_dim": geometry.channels,
            "packed_dim": int(configs["transformer"]["in_channels"]),
            "height": request.height,
            "width": request.width,
            "latent_tokens": (request.height // patch) * (request.width // patch),
            "prompt_len": T2I_MAX_SEQUENCE_LENGTH,
        }
        if task == "edit":
            symbols["prompt_len"] = edit_prompt_len_bound(configs["text_encoder"]["vision_config"])
            symbols["image_latent_h"] = symbols["image_latent_w"] = edit_image_size_bounds()[0] // geometry.scale
        return symbols

    def split_refusal(self, kind: str) -> str:
        if kind == "ulysses":
            return ("Qwen-Image attends over text and image tokens jointly, which this engine does not split by "
                    "sequence; use parallel: {cfg: 2}")
        return super().split_refusal(kind)

    def find_source(self, task: str, path: str) -> Path | None:
        from nodes.qwen_image.sources import find_source

        return find_source(task, path)

    # -- runtime ------------------------------------------------------------------------------------------

    def resolve_source(self, task: str, path: str) -> Path:
        from nodes.qwen_image.sources import resolve_source

        return resolve_source(task, path)

    def load_components(self, task, names, source, device, dtype):
        from nodes.qwen_image.loading import load_components

        return load_components(task, names, source, device, dtype)

    def build_stage(self, task, name, components, device, dtype, configs):
        from nodes.qwen_image.stages import build_stage

        return build_stage(task, name, components, device, dtype, configs)

    def export_recipes(self, task, stage):
        from nodes.qwen_image.exports import export_recipes

        return export_recipes(stage)

    def write_output(self, request, outputs, out_dir, stem, *, meta=None, save_frames=False):
        from engine.models.outputs import write_image

        return write_image(request, outputs, out_dir, stem, meta=meta, save_frames=save_frames)
