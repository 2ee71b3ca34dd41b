"""Export a recipe's module as an ONNX graph for one set of input shapes (static): the input of every graph backend."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch

from engine.backends.recipe import ExportRecipe

OPSET = 18
MODEL = "model.onnx"


def exporter() -> str:
    return f"torch {torch.__version__} onnx opset {OPSET}"


def export_onnx(recipe: ExportRecipe, inputs: tuple[torch.Tensor, ...], folder: Path) -> Path:
    """Write ``recipe.module`` traced at ``inputs`` to ``folder/model.onnx`` (weights beside it); return its path."""
    path = folder / MODEL
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass lines would flood the worker's log
        logging.getLogger(chatty).setLevel(logging.ERROR)
    chatter = io.StringIO()  # the exporter prints its progress; the stage logs its own
    with torch.no_grad(), contextlib.redirect_stdout(chatter):
        torch.onnx.export(recipe.module.eval(), inputs, str(path), input_names=list(recipe.input_names),
                          output_names=list(recipe.output_names), opset_version=OPSET, dynamo=True, external_data=True)
    return path
