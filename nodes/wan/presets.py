"""Random-weight Wan models in the real diffusers layout, built locally (no download).

``tiny`` keeps every component small enough that a 32x32..64x48 request with 5-9 frames and 2-4 steps
runs in about a second on a CPU. ``bench`` keeps that compute but gives the tensors crossing the edges
the real Wan2.1 480P widths (umT5 4096-wide prompt embeddings, 257 x 1280 CLIP tokens, z_dim 16), so a
transport benchmark moves the real byte counts. ``tiny-ti2v`` is Wan2.2 TI2V-5B's layout at the tiny sizes (text to
video and image to video, one model under each pipeline): the Wan2.2 VAE (48 latent channels, residual blocks, a 2x2
patchify) and a pipeline with ``expand_timesteps``;
its VAE compresses 8x in space rather than the real 16x, so that the graphs' small requests fall on its token grid.

Weights come from a fixed seed per component: every process builds the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.models.sources import latent_statistics

#: Seed of the random weights; each component reseeds so its weights do not depend on build order.
SEED = 0


@dataclass(frozen=True)
class PresetSizes:
    text_dim: int  # umT5 d_model, the width of prompt_embeds
    text_layers: int
    image_size: int  # CLIP input side; image tokens = (image_size / patch)^2 + 1
    image_patch: int
    image_dim: int  # CLIP hidden size, the width of image_embeds
    heads: int
    head_dim: int
    layers: int
    vae_base_dim: int
    z_dim: int = 16  # latent channels
    vae_scale: int = 8  # the VAE's spatial downsampling, a power of two from 4 (it is always 4x in time)
    vae_patch: int | None = None  # Wan2.2 VAE (TI2V-5B): the patchify side, part of vae_scale


PRESETS = {
    "tiny": PresetSizes(
        text_dim=32, text_layers=2, image_size=32, image_patch=8, image_dim=16,
        heads=2, head_dim=12, layers=2, vae_base_dim=8,
    ),
    "bench": PresetSizes(
        text_dim=4096, text_layers=1, image_size=224, image_patch=14, image_dim=1280,
        heads=2, head_dim=12, layers=1, vae_base_dim=8,
    ),
    "tiny-ti2v": PresetSizes(
        text_dim=32, text_layers=2, image_size=32, image_patch=8, image_dim=16,
        heads=2, head_dim=12, layers=2, vae_base_dim=8, z_dim=48, vae_patch=2,
    ),
}


def serves(sizes: PresetSizes, task: str) -> bool:
    """Whether a preset of ``sizes`` is a model of ``task``: TI2V-5B's layout (the Wan2.2 VAE) runs t2v and ti2v,
    the Wan2.1 layout every task but ti2v."""
    return task in ("t2v", "ti2v") if sizes.vae_patch is not None else task != "ti2v"


def build_preset(preset: str, task: str, dest: Path) -> None:
    """Write the random-weight ``preset`` model for ``task`` (a task of the Wan family) into ``dest``."""
    build_model(PRESETS[preset], task, dest)


def build_model(sizes: PresetSizes, task: str, dest: Path) -> None:
    """Write a random-weight model of ``sizes`` for ``task`` into ``dest``."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import (
        ByT5Tokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    i2v = task.startswith("i2v")
    experts = task.endswith("_experts")  # Wan2.2 A14B: two transformers, no CLIP image encoder
    z_dim = sizes.z_dim

    # 1. Byte-level tokenizer: no vocabulary file to ship; its 384 ids bound the text encoder's vocabulary.
    tokenizer = ByT5Tokenizer()

    # 2. umT5 encoder, the architecture of umT5-XXL at a small width.
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=sizes.text_dim, d_kv=8, d_ff=64, num_layers=sizes.text_layers,
            num_heads=4, relative_attention_num_buckets=8,
        )
    )

    # 3. The DiT: I2V takes z_dim noise + 4 mask + z_dim image-latent channels (TI2V-5B's image to video z_dim: the
    #    image latent stands in the first frame); Wan2.1 I2V cross-attends to CLIP tokens. Two experts are two DiTs
    #    of one architecture, the low-noise one from the next seed.
    dim = sizes.heads * sizes.head_dim
    clip = i2v and not experts

    def dit(seed: int) -> WanTransformer3DModel:
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=sizes.heads, attention_head_dim=sizes.head_dim,
            in_channels=2 * z_dim + 4 if i2v else z_dim, out_channels=z_dim, text_dim=sizes.text_dim, freq_dim=256,
            ffn_dim=32, num_layers=sizes.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            image_dim=sizes.image_dim if clip else None, added_kv_proj_dim=dim if clip else None, rope_max_seq_len=1024,
        )

    transformer = dit(SEED)

    # 4. The causal video VAE: 4x in time, vae_scale in space (the real strides T4, H8, W8 by default). The Wan2.2
    #    VAE patchifies RGB into vae_patch^2 * 3 channels first and downsamples the rest with residual blocks.
    torch.manual_seed(SEED)
    patch = sizes.vae_patch or 1
    downsamples = (sizes.vae_scale // patch).bit_length() - 1
    mean, std = latent_statistics(AutoencoderKLWan, z_dim)
    wan22 = {} if sizes.vae_patch is None else dict(is_residual=True, patch_size=patch, in_channels=3 * patch ** 2,
                                                    out_channels=3 * patch ** 2)
    vae = AutoencoderKLWan(
        base_dim=sizes.vae_base_dim, z_dim=z_dim, dim_mult=[1] * (downsamples + 1), num_res_blocks=1,
        temperal_downsample=[False] * (downsamples - 2) + [True, True], latents_mean=mean, latents_std=std,
        scale_factor_temporal=4, scale_factor_spatial=sizes.vae_scale, **wan22,
    )

    # 5. The scheduler of the Wan2.1 repos: UniPC with flow-matching sigmas.
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )

    if experts:  # the published boundaries of Wan2.2 T2V-A14B and I2V-A14B
        pipeline = WanImageToVideoPipeline if i2v else WanPipeline
        pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                 transformer_2=dit(SEED + 1), boundary_ratio=0.9 if i2v else 0.875).save_pretrained(dest)
        return
    if task == "ti2v":  # TI2V-5B's image to video: the T2V model under the I2V pipeline, no image encoder
        WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                transformer=transformer, expand_timesteps=True).save_pretrained(dest)
        return
    if not i2v:  # TI2V-5B's pipeline gives every latent token its own timestep
        WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                    expand_timesteps=sizes.vae_patch is not None).save_pretrained(dest)
        return

    # 6. I2V: a CLIP vision encoder (penultimate hidden states) and its processor with the CLIP statistics.
    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=sizes.image_dim, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=sizes.image_size, patch_size=sizes.image_patch, projection_dim=sizes.image_dim,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size}, crop_size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        image_encoder=image_encoder, image_processor=image_processor,
    ).save_pretrained(dest)
