"""Step caching for the Wan transformer: its block stack, and TeaCache's published fits for Wan2.1.

A ``WanTransformerBlock`` is called as ``block(hidden_states, encoder_hidden_states, temb, rotary_emb)`` and
returns the hidden state. TeaCache4Wan2.1 watches the timestep projection every block is modulated with (``e0`` in
Wan's code, ``timestep_proj`` in diffusers', the ``temb`` the first block receives) and rescales its relative L1
change with a polynomial fitted per checkpoint, running the first five steps always (its ``use_ret_steps`` mode).

Source of the coefficients: TeaCache4Wan2.1/teacache_generate.py in https://github.com/ali-vilab/TeaCache
(``use_ret_steps=True``): T2V-1.3B, T2V-14B, I2V-14B-480P and I2V-14B-720P. They hold for those Wan2.1
checkpoints only: other models (Wan2.2, the random-weight presets) take the change as measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.stages import StageSpec
from engine.stepcache.blocks import BlockStack, TeaCacheProfile

#: (text to video 1.3B, text to video 14B, image to video 14B at 480P, at 720P), ``use_ret_steps`` fits.
_T2V_1_3B = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)
_T2V_14B = (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)
_I2V_480P = (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01)
_I2V_720P = (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02)
#: Steps that always run with those fits (``ret_steps``).
_FIT_RETENTION_STEPS = 5
_WAN21_T2V_DIMS = {1536: _T2V_1_3B, 5120: _T2V_14B}
_WAN21_I2V_DIM = 5120
_AREA_720P = 1280 * 720


def teacache_profile(config: Mapping[str, Any], stage: StageSpec, height: int, width: int) -> TeaCacheProfile:
    """The published fit for a Wan2.1 checkpoint, recognised by its transformer's width and by its one denoising
    stage reading CLIP image tokens or not (the I2V ones by the request's size: their 480P and 720P checkpoints share
    one config); none for any other model (the Wan2.2 experts, TI2V-5B, the presets)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    coefficients = None
    if stage.name == "denoise" and "image_embeds" in stage.inputs:
        if dim == _WAN21_I2V_DIM:
            coefficients = _I2V_720P if height * width >= _AREA_720P else _I2V_480P
    elif stage.name == "denoise" and config.get("image_dim") is None:
        coefficients = _WAN21_T2V_DIMS.get(dim)
    if coefficients is None:
        return TeaCacheProfile()
    return TeaCacheProfile(coefficients, _FIT_RETENTION_STEPS)


class WanBlocks(BlockStack):
    """``transformer.blocks``, each called with positional arguments and returning the hidden state."""

    def __init__(self, transformer: torch.nn.Module, teacache: TeaCacheProfile):
        super().__init__(transformer.blocks, teacache)

    def hidden_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def hidden_out(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def with_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def modulated_input(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        # TeaCache4Wan2.1's e0: the timestep projection the block is modulated with ([B, 6, dim], or per token
        # [B, tokens, 6, dim] with expand_timesteps).
        return args[2] if len(args) > 2 else kwargs["temb"]
