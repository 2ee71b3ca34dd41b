"""What a model family hands the backends for one exportable call inside a stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.stages import RequestParams

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


@dataclass(frozen=True)
class TensorSig:
    """Shape and dtype of one input of an exported graph: part of its artifact's key."""

    shape: tuple[int, ...]
    dtype: str  #: torch dtype name without ``torch.`` (``float32``)


#: A backend's replacement of an exported call: the input tensors in, the output tensors out (a tuple).
Call = Callable[..., "tuple[torch.Tensor, ...]"]


@dataclass(frozen=True)
class ExportRecipe:
    """One call inside a built stage that a backend can run instead of eager PyTorch.

    ``module.forward(*inputs)`` computes it eagerly from tensors alone, returning a tensor or a tuple of them; it
    calls the stage's methods unbound from the class, so that an installed replacement never calls itself.
    ``inputs(request)`` are the shapes and dtypes the stage passes it for a request: what ``engine build``
    builds for. ``install(call)`` puts ``call`` where the stage makes this call and returns the function that
    puts eager back. ``unsupported(inputs)`` says why a shape cannot be exported (None: it can). ``dynamic``
    names, per input, the axes that follow the request's size: with them one graph, exported with those axes
    dynamic, serves every size of the graph's ``limits``; without them (or where that export fails) each size
    gets a static graph of its own.
    """

    name: str  #: the call (``decode``), unique within the stage
    version: int  #: bumped whenever ``module`` or ``inputs`` change what is exported: part of the artifact key
    module: "torch.nn.Module"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    inputs: Callable[[RequestParams], tuple[TensorSig, ...]]
    install: Callable[[Call], Callable[[], None]]
    unsupported: Callable[[tuple[TensorSig, ...]], str | None] = lambda inputs: None
    dynamic: tuple[tuple[int, ...], ...] = ()


def replace_method(owner: object, name: str, replacement: Callable[..., object]) -> Callable[[], None]:
    """Shadow ``owner.name`` with ``replacement`` on this instance only; return what puts the class's method back."""
    vars(owner)[name] = replacement
    return lambda: vars(owner).pop(name, None)


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")
