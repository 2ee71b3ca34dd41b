"""Wan previews: Wan 2.1's latent space (16 channels: text and image to video, the Wan2.2 A14B experts) or Wan 2.2
TI2V-5B's (48 channels), by the model's latent channels; a model of other channels gets its first three
(:mod:`engine.preview.latent_spaces` has the tables and their source)."""

from __future__ import annotations

from engine.preview.latent_spaces import WAN21, WAN22
from engine.preview.picture import Projection, projection_for


def projection(channels: int) -> Projection:
    return projection_for(channels, WAN21, WAN22)
