"""Load the Qwen-Image components a node's stages need, and nothing else.

Each component loads on its own (:func:`engine.models.loading.load_component`): the text encoder and the
transformer whole with ``from_pretrained``, the VAE as two independent halves (``vae_encoder`` holds
``encoder.*`` and ``quant_conv.*``, ``vae_decoder`` holds ``decoder.*`` and ``post_quant_conv.*``). Every
module runs in the node's dtype, as QwenImagePipeline loaded with ``torch_dtype`` does.
AutoencoderKLQwenImage counts the causal convolutions of both halves on every ``encode`` and ``decode``
(its ``clear_cache``), so a half's absent submodules are empty modules rather than None.

The Edit ``processor`` loads as :class:`StillImageProcessor`: transformers 5 builds a Qwen2VLProcessor
only together with its video processor, which needs torchvision; Edit never passes videos.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2VLProcessor

from engine.errors import ModelError
from engine.models.loading import load_component
from engine.stages import ComponentSpec, LoadedComponents
from nodes.qwen_image.family import QwenImageFamily


class StillImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for text and still images: an image processor and a tokenizer, no video processor.

    Same files, same ``__call__`` for ``text`` and ``images`` (the video processor is only used for videos).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_components(task: str, names: tuple[str, ...], source: Path, device: str, dtype: str) -> LoadedComponents:
    """Instantiate exactly ``names`` from the model folder ``source`` on ``device``."""
    specs = QwenImageFamily().components(task)
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise ModelError(f"qwen_image {task} has no component {unknown}; components: {', '.join(specs)}")
    return LoadedComponents({name: _load(source, specs[name], device, dtype) for name in names})


def _load(source: Path, spec: ComponentSpec, device: str, dtype: str):
    if spec.name == "processor":
        return load_processor(source / spec.folder)
    component = load_component(source, spec, device, dtype)
    if spec.prefixes:  # a VAE half: the other half's submodules were removed (set to None)
        for name, child in list(component._modules.items()):
            if child is None:
                component._modules[name] = torch.nn.Module()
    return component


def load_processor(folder: Path) -> StillImageProcessor:
    """The Edit pipeline's processor from its folder (``processor/`` of a Qwen-Image-Edit model)."""
    if not folder.is_dir():
        raise ModelError(f"{folder.parent}: component folder {folder.name!r} (for 'processor') is missing")
    try:
        return StillImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load 'processor' (Qwen2VLProcessor) from {folder}: {exc}") from exc
