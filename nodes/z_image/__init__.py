"""Z-Image (Z-Image-Turbo) text-to-image as engine stages."""

from nodes.z_image.family import ZImageFamily

family = ZImageFamily()

__all__ = ["ZImageFamily", "family"]
