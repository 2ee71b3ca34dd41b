"""Model components built on the meta device: parameter counts without loading a weight.

A diffusers-layout folder names each component's library and class in ``model_index.json``; the class is
instantiated from the component's ``config.json`` under ``torch.device("meta")``, which allocates nothing.
The planner uses this for per-node weight bytes; loaders use it to materialise only part of a module.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from engine.errors import ModelError
from engine.stages import ComponentSpec

#: Libraries a model_index.json may name. Nothing else is imported from a model folder.
ALLOWED_LIBRARIES = ("diffusers", "transformers")


def read_model_index(source: Path) -> dict[str, Any]:
    index_file = source / "model_index.json"
    try:
        return json.loads(index_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{source} is not a diffusers-layout model folder: {index_file.name} is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file}: invalid JSON ({exc})") from None


def read_component_config(source: Path, folder: str) -> dict[str, Any]:
    config_file = source / folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{source}: component folder {folder!r} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}: invalid JSON ({exc})") from None


def component_class(source: Path, folder: str) -> type:
    """The model class ``model_index.json`` names for ``folder`` (diffusers or transformers only)."""
    entry = read_model_index(source).get(folder)
    if not (isinstance(entry, list) and len(entry) == 2):
        raise ModelError(f"{source}/model_index.json has no [library, class] entry for {folder!r}")
    library, class_name = entry
    if library not in ALLOWED_LIBRARIES:
        raise ModelError(f"{source}/model_index.json: {folder!r} names library {library!r}; allowed: {ALLOWED_LIBRARIES}")
    cls = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(cls, type):
        raise ModelError(f"{source}/model_index.json: {library} has no class {class_name!r} (for {folder!r})")
    return cls


def build_on_meta(source: Path, folder: str, dtype: "Any | None" = None, buffers_on_meta: bool = True) -> Any:
    """Instantiate ``folder``'s model class from its config on the meta device (no memory allocated).

    With ``buffers_on_meta=False`` only the parameters go to meta: buffers a module computes at
    construction (rotary tables) and never saves stay real, as a loader needs them.
    """
    import torch
    from accelerate import init_empty_weights

    cls = component_class(source, folder)
    with torch.device("meta") if buffers_on_meta else init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers ModelMixin
            model = cls.from_config(cls.load_config(source / folder))
        else:  # transformers PreTrainedModel
            config = cls.config_class.from_pretrained(source / folder)
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model.to(dtype) if dtype is not None else model


def matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return not prefixes or name.startswith(prefixes)


def parameter_count(source: Path, component: ComponentSpec) -> int:
    """Parameters of a component (restricted to its prefixes), a tied tensor counted once."""
    if not component.weights:
        return 0
    model = build_on_meta(source, component.folder)
    return sum(p.numel() for name, p in model.named_parameters() if matches(name, component.prefixes))


def keeps_float32(model: Any, name: str, dtype: "Any") -> bool:
    """Whether ``from_pretrained(..., dtype=dtype)`` keeps tensor ``name`` of ``model`` in float32.

    diffusers models keep the submodules named in ``_keep_in_fp32_modules`` in float32 at any dtype (a
    name matches a whole path element); transformers models do so for float16 only, and for the
    ``_keep_in_fp32_modules_strict`` names at float16 and bfloat16 too (a name matches a substring).
    """
    import torch

    if dtype == torch.float32:
        return False
    if hasattr(model, "load_config"):  # diffusers ModelMixin
        return any(module in name.split(".") for module in model._keep_in_fp32_modules or ())
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return any(module in name for module in keep)


def tensor_dtype(model: Any, name: str, tensor: Any, dtype: "Any") -> "Any":
    """The dtype a loaded ``tensor`` named ``name`` ends up in: integer tensors keep theirs."""
    import torch

    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if keeps_float32(model, name, dtype) else dtype


def parameter_bytes(source: Path, component: ComponentSpec, dtype: str) -> int:
    """Resident bytes of a loaded component: parameters and buffers (restricted to its prefixes), in the
    dtype each ends up in when loaded at ``dtype`` (``component.dtype`` wins when set). Equals
    :meth:`engine.stages.LoadedComponents.parameter_bytes` for the component as loaded, without a weight read.
    """
    import torch

    if not component.weights:
        return 0
    target = getattr(torch, component.dtype or dtype)
    model = build_on_meta(source, component.folder)
    tensors = {id(t): (name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return sum(
        t.numel() * torch.empty((), dtype=tensor_dtype(model, name, t, target)).element_size()
        for name, t in tensors.values()
        if matches(name, component.prefixes)
    )
