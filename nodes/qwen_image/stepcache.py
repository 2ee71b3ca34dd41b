"""Step caching for the Qwen-Image transformer: its dual-stream block stack and TeaCache's indicator.

A ``QwenImageTransformerBlock`` is called with keyword arguments and returns ``(encoder_hidden_states,
hidden_states)``; the transformer's output head reads the image stream only, so the cached residual is the image
stream's, and a skipped block hands both streams on as they came. TeaCache watches the first block's modulated
image input (its norm1 output shifted and scaled by the timestep modulation), as TeaCache does for the MMDiTs it
was fitted on; no fit is published for Qwen-Image, so the change is used as measured.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.stepcache.blocks import BlockStack, TeaCacheProfile


class QwenImageBlocks(BlockStack):
    """``transformer.transformer_blocks``."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__(transformer.transformer_blocks, TeaCacheProfile())

    def hidden_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return kwargs["hidden_states"]

    def hidden_out(self, output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return output[1]

    def with_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kwargs["encoder_hidden_states"], hidden

    def modulated_input(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        # The block's own first steps: img_mod(temb)'s first half shifts and scales img_norm1(hidden_states).
        image_modulation = block.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]
        modulated, _ = block._modulate(block.img_norm1(kwargs["hidden_states"]), image_modulation,
                                       kwargs.get("modulate_index"))
        return modulated
