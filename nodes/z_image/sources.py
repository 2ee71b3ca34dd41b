"""Model sources for Z-Image: the tiny preset, local folders and cached repo ids.

The ``tiny`` preset is a random-weight Z-Image-Turbo in the real diffusers layout (``Tongyi-MAI/Z-Image-Turbo``:
Qwen3 text encoder and its chat-template tokenizer, ZImageTransformer2DModel, the 16-channel AutoencoderKL,
FlowMatchEulerDiscreteScheduler with Turbo's shift), small enough that the unmodified ZImagePipeline runs it
on a CPU in about a second. Weights come from fixed seeds, so every machine builds the same model.
Architectural factors stay real: 8x VAE downsampling, 2x2 transformer patches, 16 latent channels, rotary
axes splitting each head as the real (32, 48, 48) does, the chat template's special tokens.
"""

from __future__ import annotations

from pathlib import Path

from engine.models.sources import Preset
from engine.models.sources import find_source as find_model_source
from engine.models.sources import resolve_source as resolve_model_source

#: The chat special tokens the Qwen3 template writes around a prompt.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: Qwen3's chat template for the messages ZImagePipeline writes: user turns, then the generation prompt, with an
#: empty thinking block when thinking is switched off.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
TINY_TEXT_DIM = 32
#: Z-Image-Turbo's scheduler (``scheduler/scheduler_config.json``): a fixed shift, no dynamic shifting.
TURBO_SHIFT = 3.0
#: The Flux VAE's latent normalisation, as Z-Image's ``vae/config.json`` states it.
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159


def resolve_source(task: str, path: str) -> Path:
    return resolve_model_source(f"z_image/{task}", path, _presets())


def find_source(task: str, path: str) -> Path | None:
    """The folder for ``path`` if it is there without building anything (None: the preset not built yet)."""
    return find_model_source(f"z_image/{task}", path, _presets())


def _presets() -> dict[str, Preset]:
    return {"tiny": Preset(build=build_tiny, version=1)}


def build_tiny(folder: Path) -> None:
    """Write the tiny random-weight Z-Image-Turbo into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    # 1. Text side: a byte-level tokenizer with the chat template (no vocabulary file) and a two-layer Qwen3
    #    (the pipeline reads the second-to-last hidden states).
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = _tiny_text_encoder(tokenizer)

    # 2. The single-stream DiT: 2x2 patches of 16 channels; heads of 16 split 4/6/6 over the rotary axes.
    torch.manual_seed(1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=TINY_TEXT_DIM, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512],
    )

    # 3. The Flux-style VAE: four levels (three 2x downsamplings, 8x), 16 latent channels, no quant convs.
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=TURBO_SHIFT, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipeline.save_pretrained(folder)


def _tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={byte: i for i, byte in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              chat_template=CHAT_TEMPLATE)


def _tiny_text_encoder(tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return Qwen3Model(config).eval()
