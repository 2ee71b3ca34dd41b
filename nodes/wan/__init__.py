"""Wan2.1 text-to-video and image-to-video as engine stages."""

from nodes.wan.family import WanFamily

family = WanFamily()

__all__ = ["WanFamily", "family"]
