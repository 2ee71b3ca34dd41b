"""Load the Z-Image components a node's stages need, and nothing else.

Each component loads on its own (:func:`engine.models.loading.load_component`): the text encoder and the
transformer whole with ``from_pretrained``, the VAE as its decoder half only (``decoder.*`` and
``post_quant_conv.*``, an ``AutoencoderKL`` whose encoder is absent). Every module runs in the node's dtype,
as ZImagePipeline loaded with ``torch_dtype`` does.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ModelError
from engine.models.loading import load_component
from engine.stages import LoadedComponents
from nodes.z_image.family import ZImageFamily


def load_components(names: tuple[str, ...], source: Path, device: str, dtype: str) -> LoadedComponents:
    """Instantiate exactly ``names`` from the model folder ``source`` on ``device``."""
    specs = ZImageFamily().components("t2i")
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise ModelError(f"z_image has no component {unknown}; components: {', '.join(specs)}")
    return LoadedComponents({name: load_component(source, specs[name], device, dtype) for name in names})
