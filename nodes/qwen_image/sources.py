"""Model sources for Qwen-Image: the tiny presets, local folders and cached repo ids.

The ``tiny`` preset is a random-weight Qwen-Image in the real diffusers layout (``Qwen/Qwen-Image`` for
t2i, ``Qwen/Qwen-Image-Edit`` for edit, which adds the ``processor`` folder), small enough that the
unmodified diffusers pipelines run it on a CPU in about a second. Weights come from fixed seeds, so every
machine builds the same model. Architectural factors stay real: 8x VAE downsampling, 2x2 latent
packing, z_dim 16, 14-pixel vision patches merged 2x2, the Qwen chat special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.models.sources import Preset, latent_statistics
from engine.models.sources import find_source as find_model_source
from engine.models.sources import resolve_source as resolve_model_source

#: The chat and vision special tokens the Qwen-Image prompt templates use.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_TEXT_DIM = 32
#: The Edit processor's pixel budget: at most 16 vision tokens per image keeps the tiny model fast.
TINY_MAX_PIXELS = 28 * 28 * 16


def resolve_source(task: str, path: str) -> Path:
    return resolve_model_source(f"qwen_image/{task}", path, _presets(task))


def find_source(task: str, path: str) -> Path | None:
    """The folder for ``path`` if it is there without building anything (None: the preset not built yet)."""
    return find_model_source(f"qwen_image/{task}", path, _presets(task))


def _presets(task: str) -> dict[str, Preset]:
    return {"tiny": Preset(build=lambda folder: build_tiny(folder, edit=task == "edit"), version=2)}


def build_tiny(folder: Path, *, edit: bool, z_dim: int = 16, vae_scale: int = 8) -> None:
    """Write the tiny random-weight model into ``folder`` (QwenImageEditPipeline layout when ``edit``).

    ``z_dim`` (latent channels) and ``vae_scale`` (the VAE's spatial downsampling, a power of two) shape
    other geometries than Qwen-Image's for tests; the defaults build the ``tiny`` preset.
    """
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel

    # 1. Text side: a byte-level tokenizer (no vocabulary file) and a two-layer Qwen2.5-VL.
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = _tiny_text_encoder(tokenizer)

    # 2. The MMDiT (in_channels = 4 * z_dim for 2x2 packing) and the VAE (three 2x downsamplings at scale 8).
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(2)
    # no residual blocks in the encoder (the decoder keeps one per level): Edit encodes its input at about
    # a megapixel, which full-resolution blocks would make take many seconds on a CPU
    downsamples = vae_scale.bit_length() - 1
    mean, std = latent_statistics(AutoencoderKLQwenImage, z_dim)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1] * (downsamples + 1), num_res_blocks=0,
        temperal_downsample=[False, *[True] * (downsamples - 1)], latents_mean=mean, latents_std=std,
    )

    # 3. The real Qwen-Image scheduler configuration.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    pipeline = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipeline.save_pretrained(folder)
    if edit:
        _add_edit_processor(folder, tokenizer)


def _tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={byte: i for i, byte in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _tiny_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    special = {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            # multimodal rotary sections (temporal, height, width) over half the 16-wide heads
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
            **special,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_DIM,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _add_edit_processor(folder: Path, tokenizer) -> None:
    """Add the ``processor`` folder (tokenizer + Qwen2-VL image processor) and switch the index to Edit.

    The files are written part by part, as the real ``Qwen/Qwen-Image-Edit`` holds them, so that building
    the preset does not need the video processor (and torchvision) that constructing a processor does.
    """
    from transformers import Qwen2VLImageProcessor

    processor_dir = folder / "processor"
    tokenizer.save_pretrained(processor_dir)
    Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=TINY_MAX_PIXELS).save_pretrained(processor_dir)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "QwenImageEditPipeline"
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
