"""Export a recipe's module as an ONNX graph, for one set of input shapes (static) or for a range of them (its
dynamic axes bounded as the range says): the input of every graph backend."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from pathlib import Path

import torch

from engine.backends.cache import Range
from engine.backends.recipe import ExportRecipe

OPSET = 18
MODEL = "model.onnx"


def exporter() -> str:
    return f"torch {torch.__version__} onnx opset {OPSET}"


def export_onnx(recipe: ExportRecipe, inputs: tuple[torch.Tensor, ...], folder: Path, dynamic: Range | None = None) -> Path:
    """Write ``recipe.module`` traced at ``inputs`` to ``folder/model.onnx`` (weights beside it); return its path.
    With ``dynamic``, its dynamic axes stay symbolic (torch.export relates them itself: a cache twice the latents'
    height stays twice it); a module that fixes one of them raises, and the caller falls back to static graphs.
    The range's bounds are not given to the exporter: the parity gate checks the graph at both ends of it."""
    path = folder / MODEL
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass lines would flood the worker's log
        logging.getLogger(chatty).setLevel(logging.ERROR)
    chatter = io.StringIO()  # the exporter prints its progress; the stage logs its own
    shapes = _dynamic_shapes(recipe.module, dynamic.axes) if dynamic is not None else None
    with torch.no_grad(), contextlib.redirect_stdout(chatter):
        torch.onnx.export(recipe.module.eval(), inputs, str(path), input_names=list(recipe.input_names),
                          output_names=list(recipe.output_names), opset_version=OPSET, dynamo=True, external_data=True,
                          dynamic_shapes=shapes)
    if dynamic is not None:
        _check_dynamic(path, recipe.input_names, dynamic.axes)
    return path


def _dynamic_shapes(module: torch.nn.Module, axes: tuple[tuple[int, ...], ...]) -> tuple:
    """torch.export's ``dynamic_shapes`` for ``module.forward``'s parameters: each input's dynamic axes as
    ``Dim.DYNAMIC``, the inputs a ``*args`` parameter takes grouped in a tuple."""
    specs = [{axis: torch.export.Dim.DYNAMIC for axis in input_axes} for input_axes in axes]
    shaped: list = []
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if len(specs) > len(shaped):  # torch.export counts an empty *args as no input at all
                shaped.append(tuple(specs[len(shaped):]))
            break
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            shaped.append(specs[len(shaped)])
    return tuple(shaped)


def _check_dynamic(path: Path, names: tuple[str, ...], axes: tuple[tuple[int, ...], ...]) -> None:
    """Raise where the exported graph fixed an axis meant to stay dynamic (the module read it as a number)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    fixed = [f"{name}[{axis}] = {dims[name][axis].dim_value}" for name, input_axes in zip(names, axes)
             for axis in input_axes if not dims[name][axis].dim_param]
    if fixed:
        raise RuntimeError(f"the export fixed axes meant to follow the size: {', '.join(fixed)}")
