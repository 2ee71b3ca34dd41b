"""Step caching for the Z-Image transformer: its main layers and TeaCache's indicator.

Z-Image runs its noise and context refiners, joins image and caption tokens into one sequence, then runs
``transformer.layers`` on it, each called as ``layer(x, attn_mask, freqs_cis, adaln_input, ...)`` returning ``x``:
those layers are the cached stack. TeaCache watches the first layer's modulated input (its attention norm scaled by
the timestep modulation); no fit is published for Z-Image, so the change is used as measured.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import ModelError
from engine.stepcache.blocks import BlockStack, TeaCacheProfile

_NOISE_MASK = 4  # layer(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)


class ZImageBlocks(BlockStack):
    """``transformer.layers``."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__(transformer.layers, TeaCacheProfile())

    def hidden_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0]

    def hidden_out(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def with_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def modulated_input(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x, adaln_input = args[0], args[3]
        if len(args) > _NOISE_MASK and args[_NOISE_MASK] is not None:
            raise ModelError("teacache on Z-Image runs with one timestep modulation for all tokens (not omni mode)")
        # The layer's own first steps: adaLN_modulation's first quarter scales the attention norm.
        scale_msa = 1.0 + block.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)[0]
        return block.attention_norm1(x) * scale_msa
