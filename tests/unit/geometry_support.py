"""Tiny random-weight models of other latent geometries than the presets': a VAE of 8 latent channels (``z8``)
and a VAE that downsamples 4x instead of 8x (``x4``), each with a transformer to match, built by the presets'
own builders so that only the geometry differs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

GEOMETRIES = {"z8": {"z_dim": 8}, "x4": {"vae_scale": 4}}
TASKS = [("qwen_image", "t2i"), ("qwen_image", "edit"), ("wan", "t2v"), ("wan", "i2v")]


def build_model(family: str, task: str, geometry: str, folder: Path) -> Path:
    """Write the tiny ``family`` ``task`` model of ``geometry`` into ``folder`` and return it."""
    if family == "wan":
        from nodes.wan.presets import PRESETS, build_model as build_wan

        build_wan(dataclasses.replace(PRESETS["tiny"], **GEOMETRIES[geometry]), task, folder)
    else:
        from nodes.qwen_image.sources import build_tiny

        build_tiny(folder, edit=task == "edit", **GEOMETRIES[geometry])
    return folder
