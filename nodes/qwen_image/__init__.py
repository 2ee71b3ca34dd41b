"""Qwen-Image text-to-image and Edit as engine stages."""

from nodes.qwen_image.family import QwenImageFamily

family = QwenImageFamily()

__all__ = ["QwenImageFamily", "family"]
