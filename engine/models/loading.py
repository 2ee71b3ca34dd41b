"""Load one component of a diffusers-layout model folder, materialising only what a node holds.

Family-agnostic: a family describes its components as :class:`~engine.stages.ComponentSpec` and calls
:func:`load_component` for each one its node's stages need.

- Components without weights (tokenizers, image processors, schedulers) load whole with their class's
  ``from_pretrained``.
- A whole module loads with its library's ``from_pretrained``, so the library's own dtype rules apply
  (submodules kept in float32) and the weights are exactly those the monolithic pipeline loads.
- A module restricted to ``prefixes`` (the encoder half of a VAE) is built with its parameters on the
  meta device, the submodules outside the prefixes are removed, and only the safetensors keys under the
  prefixes are read and assigned. The other half is never allocated, and the object's parameters are
  exactly the part it holds, so resident bytes count only that. The module stays an instance of its
  class: the methods that use only the held half (``encode`` for an encoder half) work unchanged.

Devices are torch device strings (``cpu``, ``cuda:0``, ``xpu:0``); dtypes are names (``bfloat16``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelError
from engine.models.meta import build_on_meta, component_class, matches, tensor_dtype
from engine.stages import ComponentSpec

__all__ = ["DTYPES", "load_component", "load_part", "prune", "read_safetensors", "torch_dtype"]

#: The dtype names a node may run in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a name in :data:`DTYPES`."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unsupported model dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def load_component(source: Path, component: ComponentSpec, device: str, dtype: str) -> Any:
    """Load ``component`` from the model folder ``source`` onto ``device``.

    Modules run in ``component.dtype`` when the component fixes one, else in ``dtype``.
    """
    folder = source / component.folder
    if not folder.is_dir():
        raise ModelError(f"{source}: component folder {component.folder!r} (for {component.name!r}) is missing")
    cls = component_class(source, component.folder)
    if not component.weights:
        return _from_pretrained(cls, folder, component)
    target = torch_dtype(component.dtype or dtype)
    if component.prefixes:
        model = load_part(source, component.folder, component.prefixes, device, target)
    else:
        model = _from_pretrained(cls, folder, component, dtype=target).to(device)
    return model.eval()


def _from_pretrained(cls: type, folder: Path, component: ComponentSpec, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {component.name!r} ({cls.__name__}) from {folder}: {exc}") from exc


def load_part(source: Path, folder: str, prefixes: tuple[str, ...], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build ``folder``'s module holding only the parameters under ``prefixes``, loaded from its safetensors."""
    # 1. Construct without allocating parameters; buffers computed at construction stay real.
    model = build_on_meta(source, folder, buffers_on_meta=False)

    # 2. Drop every submodule outside the prefixes, so the unused half is neither loaded nor counted.
    prune(model, prefixes)

    # 3. Read just the held keys (safetensors reads each tensor on its own) in the dtype each ends up in.
    state = {
        name: tensor.to(device=device, dtype=tensor_dtype(model, name, tensor, dtype))
        for name, tensor in read_safetensors(source / folder, prefixes).items()
    }

    # 4. Assign them in place of the meta parameters; strict, so a missing or stray key is an error.
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{source / folder}: weights do not match the model for {prefixes}: {exc}") from exc

    # 5. Buffers computed at construction follow the parameters to the device and dtype.
    for name, buffer in list(model.named_buffers()):
        owner, _, local = name.rpartition(".")
        model.get_submodule(owner)._buffers[local] = buffer.to(device=device, dtype=tensor_dtype(model, name, buffer, dtype))
    return model


def prune(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    """Remove the submodules of ``model`` that hold nothing under ``prefixes`` (set them to None).

    A parameter left outside the prefixes after that (one owned by a kept module) is an error: the
    prefixes must name whole submodules.
    """
    removed: list[str] = []
    for name, module in list(model.named_modules()):
        path = name + "."
        if not name or path.startswith(tuple(removed)):
            continue
        held = matches(path, prefixes) or any(prefix.startswith(path) for prefix in prefixes)
        if not held:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, None)
            removed.append(path)
    stray = [name for name, _ in model.named_parameters() if not matches(name, prefixes)]
    if stray:
        raise ModelError(f"{type(model).__name__}: prefixes {prefixes} do not name whole submodules; outside them: {stray[:5]}")


def read_safetensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a component folder whose names start with one of ``prefixes``, read from disk on CPU.

    Handles a single ``*.safetensors`` file and sharded checkpoints with a ``*.safetensors.index.json``.
    """
    from safetensors import safe_open

    files = _safetensors_files(folder, prefixes)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if matches(key, prefixes):
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise ModelError(f"{folder}: no weights under {prefixes} in {[f.name for f in files]}")
    return tensors


def _safetensors_files(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return sorted({folder / file for key, file in weight_map.items() if matches(key, prefixes)})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no .safetensors weights (other formats are not loaded)")
    return files
