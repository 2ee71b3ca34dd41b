"""Qwen-Image previews: its VAE makes Wan 2.1's latent space (16 channels); a model of other channels gets its first
three (:mod:`engine.preview.latent_spaces` has the table and its source)."""

from __future__ import annotations

from engine.preview.latent_spaces import WAN21
from engine.preview.picture import Projection, projection_for


def projection(channels: int) -> Projection:
    return projection_for(channels, WAN21)
