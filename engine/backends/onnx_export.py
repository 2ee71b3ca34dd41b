"""Export a recipe's module as an ONNX graph, for one set of input shapes (static) or for a range of them (its
dynamic axes bounded as the range says): the input of every graph backend."""

from __future__ import annotations

import contextlib
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
    With ``dynamic``, its dynamic axes stay symbolic within the range's bounds (torch.export fails when the module
    fixes one)."""
    path = folder / MODEL
    shapes = None
    if dynamic is not None:
        # One Dim per input and axis; an axis whose bounds meet stays static. The module's forward takes *inputs.
        shapes = (tuple({axis: torch.export.Dim(f"{name}_{axis}", min=low[axis], max=high[axis])
                         for axis in axes if low[axis] < high[axis]}
                        for name, axes, low, high in zip(recipe.input_names, dynamic.axes, dynamic.smallest,
                                                         dynamic.largest)),)
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass lines would flood the worker's log
        logging.getLogger(chatty).setLevel(logging.ERROR)
    chatter = io.StringIO()  # the exporter prints its progress; the stage logs its own
    with torch.no_grad(), contextlib.redirect_stdout(chatter):
        torch.onnx.export(recipe.module.eval(), inputs, str(path), input_names=list(recipe.input_names),
                          output_names=list(recipe.output_names), opset_version=OPSET, dynamo=True, external_data=True,
                          dynamic_shapes=shapes)
    return path
