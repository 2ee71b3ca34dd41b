"""The graph's model against its family: can the family's stages run a model with these configs?

Reads the config of every weighted component folder (JSON only: no torch, no weight), asks the family what
in them its stages cannot run (each problem naming its config field), then evaluates every stage's declared
outputs at the largest request, so that a geometry no stage can produce is refused here, before any worker
starts. ``engine validate``, ``engine plan`` and ``engine run`` all go through :func:`check_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.models.meta import read_component_config
from engine.plan.check import CheckedGraph
from engine.plan.parallel import check_sequence
from engine.plan.shapes import ShapeExpressionError, evaluate_shape
from engine.stages import ModelFamily, RequestParams


def component_configs(family: ModelFamily, task: str, source: Path) -> dict[str, dict[str, Any]]:
    """Parsed config.json of every weighted component folder ``task`` uses, by folder."""
    folders = sorted({c.folder for c in family.components(task).values() if c.weights})
    return {folder: read_component_config(source, folder) for folder in folders}


def check_model(checked: CheckedGraph, source: Path, sizing: RequestParams) -> dict[str, dict[str, Any]]:
    """The model's component configs once the family can run them at ``sizing`` (the largest request);
    SpecError at ``model.path`` naming every config field the family cannot run otherwise."""
    spec, family = checked.loaded.spec, checked.family
    task = spec.model.task
    configs = component_configs(family, task, source)
    found = [f"{source}/{problem}" for problem in family.check_configs(task, configs)]
    if not found:
        found = _unproducible_outputs(checked, configs, sizing)
    if found:
        what = f"{spec.model.family} {task} cannot run this model: "
        raise SpecError([checked.loaded.lines.problem(("model", "path"), what + problem) for problem in found])
    split_problems = check_sequence(checked, configs, sizing)
    if split_problems:
        raise SpecError(split_problems)
    return configs


def _unproducible_outputs(checked: CheckedGraph, configs: dict[str, dict[str, Any]], sizing: RequestParams) -> list[str]:
    """Why a stage's declared output has no shape at ``sizing`` with these configs, one line per output."""
    task = checked.loaded.spec.model.task
    try:
        symbols = checked.family.shape_symbols(task, configs, sizing)
    except KeyError as exc:
        return [f"a component config lacks {exc}, needed for the tensor shapes"]
    except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:  # a config of another model
        return [f"its component configs do not give the tensor shapes ({type(exc).__name__}: {exc}); "
                f"is model.path a {checked.family.name} model?"]
    found = []
    for stage in checked.stages.values():
        for tensor in stage.outputs:
            try:
                shape = evaluate_shape(tensor.shape, symbols)
            except ShapeExpressionError as exc:
                found.append(f"stage {stage.name!r} output {tensor.name!r}: {exc}")
                continue
            if 0 in shape:
                declared = ", ".join(map(str, tensor.shape))
                found.append(f"stage {stage.name!r} output {tensor.name!r} would be empty: shape {list(shape)} "
                             f"for [{declared}] at the largest request")
    return found
