"""Wan family declaration: tasks, stages, components, request parameters and shape symbols.

Wan2.1 (``t2v``, ``i2v``) denoises with one transformer. Wan2.2 A14B (``t2v_experts``, ``i2v_experts``) denoises
with two experts, as diffusers' pipelines with ``transformer_2`` and ``boundary_ratio`` do: ``transformer`` (high
noise) takes the steps whose timestep is at least ``boundary_ratio * num_train_timesteps``, ``transformer_2`` (low
noise) the rest. Each expert is a stage of its own, so a graph may put them on two nodes; what the loop carries
from one to the other (the latents and the multistep scheduler's state) crosses as declared tensors.
Wan2.2 TI2V-5B runs text to video as ``t2v`` and image to video as ``ti2v``, diffusers' WanImageToVideoPipeline with
``expand_timesteps``: no CLIP image tokens and no condition channels; the image enters as the first latent frame (the
VAE latent of that one frame), which every step puts back in place of the denoised one and keeps at timestep 0.

Only data and pydantic here (no torch import): ``engine validate`` reads this in milliseconds.
The runtime side (loading, stage execution, output writing) lives in the sibling modules and is
imported only when a worker needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from engine.stages import (CHECK_FILES, MODEL_DTYPE, CachePart, ComponentSpec, ConfigProblem, Configs, ModelFamily,
                           RequestParams, RequestProblem, SequenceShape, StageSpec, TensorSpec)
from nodes.wan.geometry import config_problems, latent_geometry, request_problems

#: The umT5 prompt length the Wan pipelines pad to.
TEXT_LEN = 512
#: Most steps of multistep history the experts' hand-over carries (the scheduler's ``solver_order``; Wan's is 2).
MAX_SOLVER_ORDER = 3

_LATENT = ("batch", "z_dim", "latent_frames", "latent_h", "latent_w")

TEXT_ENCODE = StageSpec(
    "text_encode",
    components=("tokenizer", "text_encoder"),
    outputs=(
        TensorSpec("prompt_embeds", MODEL_DTYPE, ("batch", "text_len", "text_dim")),
        TensorSpec("negative_prompt_embeds", MODEL_DTYPE, ("batch", "text_len", "text_dim"), optional=True),
    ),
    description="umT5 prompt embeddings (and negative prompt embeddings when guidance is on)",
    cache_key=("prompt", "negative_prompt", "guidance_scale"),
    cache_parts=(CachePart("prompt", ("prompt",), ("prompt_embeds",)),
                 CachePart("negative_prompt", ("negative_prompt",), ("negative_prompt_embeds",))),
)
IMAGE_ENCODE = StageSpec(
    "image_encode",
    components=("image_processor", "image_encoder"),
    outputs=(TensorSpec("image_embeds", MODEL_DTYPE, ("batch", "image_tokens", "image_dim")),),
    description="CLIP vision penultimate hidden states of the input image",
    reads=("image",),
    cache_key=("image",),
)
VAE_ENCODE = StageSpec(
    "vae_encode",
    components=("vae_encoder",),
    outputs=(TensorSpec("condition", MODEL_DTYPE, ("batch", "t_scale + z_dim", "latent_frames", "latent_h", "latent_w")),),
    description="first-frame mask and VAE latent of the input image (I2V conditioning)",
    reads=("image",),
)
# TI2V-5B: the latent of the first frame alone. Float32, not the node's dtype: the loop mixes it with the float32
# latents before casting to the transformer's dtype.
VAE_ENCODE_FIRST_FRAME = StageSpec(
    "vae_encode",
    components=("vae_encoder",),
    outputs=(TensorSpec("condition", "float32", ("batch", "z_dim", 1, "latent_h", "latent_w")),),
    description="VAE latent of the input image, the first latent frame (TI2V-5B image to video)",
    reads=("image",),
)
#: The DiT stages split their guidance branches and their tokens (nodes.wan.parallel).
DIT_SPLITS = ("cfg", "ulysses")
DENOISE_T2V = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=("prompt_embeds", "negative_prompt_embeds"),
    outputs=(TensorSpec("latents", "float32", _LATENT),),
    description="DiT denoising loop with classifier-free guidance",
    splits=DIT_SPLITS,
    step_cached=True,
)
DENOISE_I2V = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=("prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition"),
    outputs=(TensorSpec("latents", "float32", _LATENT),),
    description="DiT denoising loop with classifier-free guidance, conditioned on the image",
    splits=DIT_SPLITS,
    step_cached=True,
)
DENOISE_FIRST_FRAME = StageSpec(
    "denoise",
    components=("transformer", "scheduler"),
    inputs=("prompt_embeds", "negative_prompt_embeds", "condition"),
    outputs=(TensorSpec("latents", "float32", _LATENT),),
    description="DiT denoising loop with classifier-free guidance, the image's latent held as the first frame",
    splits=DIT_SPLITS,
    step_cached=True,
)
# Wan2.2 A14B: the loop in two stages. The high-noise expert hands the low-noise one its latents and the
# scheduler's multistep state (absent when the boundary falls before the first step).
SCHEDULER_STATE = (
    TensorSpec("scheduler_model_outputs", "float32", ("solver_order", *_LATENT), optional=True, variable=(0,)),
    TensorSpec("scheduler_timesteps", "int64", ("solver_order",), optional=True, variable=(0,)),
    TensorSpec("scheduler_last_sample", "float32", _LATENT, optional=True),
    TensorSpec("scheduler_counters", "int64", (3,), optional=True),
)
_HANDOVER = ("boundary_latents", *(spec.name for spec in SCHEDULER_STATE))
_T2V_CONDITIONING = ("prompt_embeds", "negative_prompt_embeds")
_I2V_CONDITIONING = (*_T2V_CONDITIONING, "condition")


def _experts(conditioning: tuple[str, ...]) -> tuple[StageSpec, StageSpec]:
    high = StageSpec(
        "denoise_high",
        components=("transformer", "scheduler"),
        inputs=conditioning,
        outputs=(TensorSpec("boundary_latents", "float32", _LATENT), *SCHEDULER_STATE),
        description="the high-noise expert (transformer): the steps down to the boundary timestep",
        splits=DIT_SPLITS,
        step_cached=True,
    )
    low = StageSpec(
        "denoise_low",
        components=("transformer_2", "scheduler"),
        inputs=(*conditioning, *_HANDOVER),
        outputs=(TensorSpec("latents", "float32", _LATENT),),
        description="the low-noise expert (transformer_2): the steps past the boundary timestep",
        splits=DIT_SPLITS,
        step_cached=True,
    )
    return high, low


VAE_DECODE = StageSpec(
    "vae_decode",
    components=("vae_decoder",),
    inputs=("latents",),
    outputs=(TensorSpec("frames", "float32", ("batch", "num_frames", "height", "width", 3)),),
    description="VAE decoder to RGB frames in [0, 1]",
    exportable=True,
)

_STAGES = {
    "t2v": (TEXT_ENCODE, DENOISE_T2V, VAE_DECODE),
    "i2v": (TEXT_ENCODE, IMAGE_ENCODE, VAE_ENCODE, DENOISE_I2V, VAE_DECODE),
    "ti2v": (TEXT_ENCODE, VAE_ENCODE_FIRST_FRAME, DENOISE_FIRST_FRAME, VAE_DECODE),
    # The A14B image-to-video transformers take no CLIP image tokens (their image_dim is null).
    "t2v_experts": (TEXT_ENCODE, *_experts(_T2V_CONDITIONING), VAE_DECODE),
    "i2v_experts": (TEXT_ENCODE, VAE_ENCODE, *_experts(_I2V_CONDITIONING), VAE_DECODE),
}

# The VAE and the CLIP image encoder run in float32 whatever the node's dtype, as in the diffusers Wan
# examples (they load both with torch_dtype=torch.float32 next to a bfloat16 pipeline).
_COMPONENTS = {
    "tokenizer": ComponentSpec("tokenizer", "tokenizer", weights=False),
    "text_encoder": ComponentSpec("text_encoder", "text_encoder"),
    "image_processor": ComponentSpec("image_processor", "image_processor", weights=False),
    "image_encoder": ComponentSpec("image_encoder", "image_encoder", dtype="float32"),
    "transformer": ComponentSpec("transformer", "transformer"),
    "transformer_2": ComponentSpec("transformer_2", "transformer_2"),
    "scheduler": ComponentSpec("scheduler", "scheduler", weights=False),
    "vae_encoder": ComponentSpec("vae_encoder", "vae", prefixes=("encoder.", "quant_conv."), dtype="float32"),
    "vae_decoder": ComponentSpec("vae_decoder", "vae", prefixes=("decoder.", "post_quant_conv."), dtype="float32"),
}
_TASK_COMPONENTS = {
    "t2v": ("tokenizer", "text_encoder", "transformer", "scheduler", "vae_encoder", "vae_decoder"),
    "i2v": ("tokenizer", "text_encoder", "image_processor", "image_encoder", "transformer", "scheduler", "vae_encoder",
            "vae_decoder"),
    "ti2v": ("tokenizer", "text_encoder", "transformer", "scheduler", "vae_encoder", "vae_decoder"),
    "t2v_experts": ("tokenizer", "text_encoder", "transformer", "transformer_2", "scheduler", "vae_decoder"),
    "i2v_experts": ("tokenizer", "text_encoder", "transformer", "transformer_2", "scheduler", "vae_encoder",
                    "vae_decoder"),
}


class WanRequest(RequestParams):
    """A Wan2.1 text-to-video request."""

    size_fields: ClassVar[tuple[str, ...]] = ("height", "width", "num_frames")

    prompt: str = Field(min_length=1, description="What the video shows.")
    negative_prompt: str = Field("", description="What the video should not show (used when guidance_scale > 1).")
    height: int = Field(480, ge=16, le=4096, multiple_of=16, description="Frame height in pixels, a multiple of 16.")
    width: int = Field(832, ge=16, le=4096, multiple_of=16, description="Frame width in pixels, a multiple of 16.")
    num_frames: int = Field(81, ge=1, le=1025, description="Number of frames, 4k+1 (1, 5, ..., 81).")
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(5.0, ge=0.0, le=100.0, description="Classifier-free guidance scale; <= 1 turns it off.")
    flow_shift: float | None = Field(None, gt=0.0, le=100.0, description="Scheduler flow shift; default: the model's scheduler config.")
    fps: int = Field(16, ge=1, le=120, description="Frame rate of the written video.")

    @field_validator("num_frames")
    @classmethod
    def _frames_are_4k_plus_1(cls, num_frames: int) -> int:
        if (num_frames - 1) % 4 != 0:
            below = num_frames - (num_frames - 1) % 4
            raise ValueError(f"num_frames must be 4k+1 (e.g. {below} or {below + 4}), got {num_frames}")
        return num_frames


class WanImageRequest(WanRequest):
    """A Wan2.1 or Wan2.2 TI2V-5B image-to-video request: a text request plus the first frame."""

    image: Path = Field(description="Path of the first frame (PNG/JPEG), resized to height x width.")

    @model_validator(mode="after")
    def _image_is_readable(self, info: ValidationInfo) -> "WanImageRequest":
        # Where the request is made (resolve_paths, after anchoring a relative path to the request file's folder);
        # a worker may hold a copy that came over the data plane, or none yet.
        if info.context == CHECK_FILES:
            check_image(self.image)
        return self


_BOUNDARY_DESCRIPTION = ("Timestep fraction (of num_train_timesteps) where the low-noise expert (transformer_2) "
                         "takes over; default: the model's published one.")


class WanExpertsRequest(WanRequest):
    """A Wan2.2 A14B text-to-video request: two experts split the steps at ``boundary_ratio``."""

    guidance_scale_2: float | None = Field(
        None, ge=0.0, le=100.0,
        description="Guidance scale of the low-noise expert (transformer_2); default: guidance_scale.",
    )
    boundary_ratio: float = Field(0.875, gt=0.0, lt=1.0, description=_BOUNDARY_DESCRIPTION)

    @property
    def low_noise_guidance_scale(self) -> float:
        """The pipelines' ``guidance_scale_2``: the high-noise scale unless given."""
        return self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2


class WanExpertsImageRequest(WanImageRequest, WanExpertsRequest):
    """A Wan2.2 A14B image-to-video request."""

    boundary_ratio: float = Field(0.9, gt=0.0, lt=1.0, description=_BOUNDARY_DESCRIPTION)


_REQUESTS = {"t2v": WanRequest, "i2v": WanImageRequest, "ti2v": WanImageRequest, "t2v_experts": WanExpertsRequest,
             "i2v_experts": WanExpertsImageRequest}


def check_image(path: Path) -> None:
    """Raise ValueError unless ``path`` is a readable image file (PIL is imported here, not at module load)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"image {path} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ValueError(f"image {path} cannot be read as an image: {exc}") from None


class WanFamily(ModelFamily):
    name = "wan"
    tasks = ("t2v", "i2v", "ti2v", "t2v_experts", "i2v_experts")
    presets = ("tiny", "bench", "tiny-ti2v")

    def stages(self, task: str) -> tuple[StageSpec, ...]:
        return _STAGES[task]

    def components(self, task: str) -> dict[str, ComponentSpec]:
        return {name: _COMPONENTS[name] for name in _TASK_COMPONENTS[task]}

    def request_type(self, task: str) -> type[RequestParams]:
        return _REQUESTS[task]

    def check_configs(self, task: str, configs: Configs) -> list[ConfigProblem]:
        return config_problems(task, configs)

    def request_problems(self, task: str, configs: Configs, request: RequestParams) -> list[RequestProblem]:
        assert isinstance(request, WanRequest)
        return request_problems(latent_geometry(configs), request.height, request.width, request.num_frames)

    def shape_symbols(self, task: str, configs: Configs, request: RequestParams) -> dict[str, int]:
        assert isinstance(request, WanRequest)
        geometry = latent_geometry(configs)
        symbols = {
            "batch": 1,
            "text_len": TEXT_LEN,
            "text_dim": int(configs["text_encoder"]["d_model"]),
            "z_dim": geometry.channels,
            "t_scale": geometry.t_scale,
            "s_scale": geometry.s_scale,
            "num_frames": request.num_frames,
            "height": request.height,
            "width": request.width,
            "latent_frames": (request.num_frames - 1) // geometry.t_scale + 1,
            "latent_h": request.height // geometry.s_scale,
            "latent_w": request.width // geometry.s_scale,
            "solver_order": MAX_SOLVER_ORDER,
        }
        if task == "i2v":
            vision = configs["image_encoder"]
            symbols["image_tokens"] = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
            symbols["image_dim"] = int(vision["hidden_size"])
        return symbols

    def sequence_shape(self, task: str, configs: Configs, request: RequestParams) -> SequenceShape:
        assert isinstance(request, WanRequest)
        geometry = latent_geometry(configs)
        transformer = configs["transformer"]
        p_t, p_h, p_w = transformer["patch_size"]
        latent_frames = (request.num_frames - 1) // geometry.t_scale + 1
        tokens = (latent_frames // p_t) * (request.height // geometry.s_scale // p_h) * (request.width // geometry.s_scale // p_w)
        heads = int(transformer["num_attention_heads"])
        return SequenceShape(heads=heads, tokens=tokens, hidden=heads * int(transformer["attention_head_dim"]))

    def find_source(self, task: str, path: str) -> Path | None:
        from nodes.wan.sources import find_source

        return find_source(task, path)

    # -- runtime ------------------------------------------------------------------------------------------

    def resolve_source(self, task: str, path: str) -> Path:
        from nodes.wan.sources import resolve_source

        return resolve_source(task, path)

    def load_components(self, task, names, source, device, dtype):
        from nodes.wan.loading import load_components

        return load_components(task, names, source, device, dtype)

    def build_stage(self, task, name, components, device, dtype, configs):
        from nodes.wan.stages import build_stage

        return build_stage(task, name, components, device, dtype, configs)

    def export_recipes(self, task, stage):
        from nodes.wan.exports import export_recipes

        return export_recipes(stage)

    def write_output(self, request, outputs, out_dir, stem, *, meta=None, save_frames=False):
        from nodes.wan.output import write_video

        return write_video(request, outputs, out_dir, stem, meta=meta, save_frames=save_frames)
