"""Load the Wan components a node's stages need, and nothing else.

Each component loads on its own (:func:`engine.models.loading.load_component`): the text encoder and
the transformer whole with ``from_pretrained``, the VAE as two independent halves (``vae_encoder``
holds ``encoder.*`` and ``quant_conv.*``, ``vae_decoder`` holds ``decoder.*`` and ``post_quant_conv.*``,
each an ``AutoencoderKLWan`` whose other half is absent). The VAE and the CLIP image encoder run in
float32 whatever the node's dtype (their ``ComponentSpec.dtype``), as in the diffusers Wan examples.
A model whose ``model_index.json`` sets ``expand_timesteps`` otherwise than its VAE implies is refused: the stages
take it from the VAE config (:mod:`nodes.wan.geometry`).
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ModelError
from engine.models.loading import load_component
from engine.models.meta import read_component_config, read_model_index
from engine.stages import LoadedComponents
from nodes.wan.family import WanFamily
from nodes.wan.geometry import expands_timesteps


def load_components(task: str, names: tuple[str, ...], source: Path, device: str, dtype: str) -> LoadedComponents:
    """Instantiate exactly ``names`` from the model folder ``source`` on ``device``."""
    specs = WanFamily().components(task)
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise ModelError(f"wan {task} has no component {unknown}; components: {', '.join(specs)}")
    expand_timesteps = expands_timesteps(read_component_config(source, "vae"))
    if read_model_index(source).get("expand_timesteps", False) != expand_timesteps:
        raise ModelError(f"{source}/model_index.json: expand_timesteps must be {str(expand_timesteps).lower()} with its "
                         "VAE (true exactly for the Wan2.2 VAE, which sets patch_size: TI2V-5B)")
    return LoadedComponents({name: load_component(source, specs[name], device, dtype) for name in names})
