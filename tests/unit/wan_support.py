"""Shared by the Wan tests: tiny models built once per test session, nodes, and edge hand-over."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.stages import DTYPE_BYTES, MODEL_DTYPE, LoadedComponents, TensorSpec
from nodes.wan import family
from nodes.wan.presets import build_preset

_ROOT = Path(tempfile.mkdtemp(prefix="wan-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

#: Partitions of each task's stages into nodes, in the layouts the graphs use.
ENCODER = ("text_encode", "image_encode", "vae_encode")
PARTITIONS = {
    "one_node": [(*ENCODER, "denoise", "vae_decode")],
    "encoder_decoder+transformer": [(*ENCODER, "vae_decode"), ("denoise",)],
    "three_nodes": [ENCODER, ("denoise",), ("vae_decode",)],
}


@cache
def tiny(task: str) -> Path:
    """The tiny random-weight model of ``task``, built once into a session folder."""
    folder = _ROOT / f"tiny-{task}"
    build_preset("tiny", task, folder)
    return folder


def configs(source: Path) -> dict[str, dict]:
    """Component configs by folder, as the engine passes them to ``shape_symbols``."""
    return {
        folder: json.loads((source / folder / "config.json").read_text())
        for folder in ("text_encoder", "vae", "image_encoder", "transformer")
        if (source / folder / "config.json").is_file()
    }


def node_stages(task: str, node: tuple[str, ...]) -> list[str]:
    """The node's stages that exist in ``task``, in execution order."""
    return [spec.name for spec in family.stages(task) if spec.name in node]


def node_components(task: str, node: tuple[str, ...]) -> tuple[str, ...]:
    """The components a node holding ``node``'s stages loads (the union over its stages, in order)."""
    names: dict[str, None] = {}
    for spec in family.stages(task):
        if spec.name in node:
            names.update(dict.fromkeys(spec.components))
    return tuple(names)


@cache
def load_node(task: str, node: tuple[str, ...], dtype: str) -> LoadedComponents:
    """A node's components, loaded on their own from the tiny folder (cached: loading is deterministic)."""
    return family.load_components(task, node_components(task, node), tiny(task), "cpu", dtype)


def over_edge(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the receiving node sees it: raw bytes through NumPy, rebuilt from dtype and shape."""
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    received = np.frombuffer(bytearray(payload), dtype=np.uint8)
    return torch.from_numpy(received).view(tensor.dtype).reshape(tensor.shape)


def declared_shape(spec: TensorSpec, symbols: dict[str, int]) -> tuple[int, ...]:
    """Evaluate a tensor's symbolic shape (integer arithmetic over the family's symbols)."""
    return tuple(dim if isinstance(dim, int) else int(eval(dim, {"__builtins__": {}}, symbols)) for dim in spec.shape)


def declared_dtype(spec: TensorSpec, model_dtype: str) -> torch.dtype:
    name = model_dtype if spec.dtype == MODEL_DTYPE else spec.dtype
    assert name in DTYPE_BYTES
    return getattr(torch, name)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (thread hand-offs dominate) and share this machine's cores; a test
    module that imports this fixture gets it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
