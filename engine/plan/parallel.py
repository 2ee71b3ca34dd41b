"""Checks of nodes that split a replica across several devices (``place.devices`` and ``parallel:``).

Statically (:func:`check_parallel`): one device per rank (the degrees' product), one kind of device, a GPU not
named twice, and only stages that can split that way. Against the model (:func:`check_sequence`): Ulysses splits
the DiT's attention heads and the tokens of every request the graph admits, so both must divide by its degree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import Problem
from engine.spec.load import LoadedGraph
from engine.spec.schema import Parallel
from engine.stages import Configs, ModelFamily, RequestParams, StageSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.plan.check import CheckedGraph


def check_parallel(loaded: LoadedGraph, family: ModelFamily, stages: dict[str, StageSpec], problems: list[Problem]) -> None:
    lines = loaded.lines
    for name, node in loaded.spec.nodes.items():
        devices = node.place.all_devices
        parallel = node.parallel or Parallel()
        where = ("nodes", name, "parallel")
        if node.parallel is None and len(devices) > 1:
            problems.append(lines.problem(("nodes", name, "place", "devices"), f"node {name!r} names {len(devices)} "
                                          "devices but no `parallel:` saying how its replica splits across them "
                                          "(e.g. parallel: {cfg: 2} or {ulysses: 2})"))
            continue
        if parallel.ranks != len(devices):
            problems.append(lines.problem(where, f"cfg {parallel.cfg} x ulysses {parallel.ulysses} is {parallel.ranks} "
                                                 f"ranks, but the node has {len(devices)} device"
                                                 f"{'s' if len(devices) > 1 else ''}; name one device per rank in "
                                                 "place.devices"))
        kinds = sorted({device.partition(":")[0] for device in devices})
        if len(kinds) > 1:
            problems.append(lines.problem(("nodes", name, "place", "devices"), f"the ranks of one replica run on one "
                                          f"kind of device; got {', '.join(kinds)}"))
        twice = sorted({d for d in devices if d != "cpu" and devices.count(d) > 1})
        if twice:
            problems.append(lines.problem(("nodes", name, "place", "devices"), f"{', '.join(twice)} named twice: each "
                                          "rank needs a GPU of its own (only cpu may repeat)"))
        if len(devices) > 1:
            for stage, chain in node.backend.items():
                if list(chain) != ["eager"]:
                    problems.append(lines.problem(("nodes", name, "backend", stage), "a node on several devices runs "
                                                  "its stages eager: each rank would choose and fall back on its own, "
                                                  "and the ranks must compute alike"))
        for kind in _degrees(parallel):
            for stage in (stages[s] for s in node.stages if s in stages):
                if kind in stage.splits:
                    continue
                can = [s.name for s in stages.values() if kind in s.splits]
                if can:
                    why = f"a node with parallel.{kind} runs only stages that can ({', '.join(can)})"
                else:  # the family's DiT does not split this way
                    why = family.split_refusal(kind)
                problems.append(lines.problem((*where, kind), f"{family.name} stage {stage.name!r} cannot split by "
                                              f"{kind}; {why}"))


def _degrees(parallel: Parallel) -> list[str]:
    return [kind for kind, degree in (("cfg", parallel.cfg), ("ulysses", parallel.ulysses)) if degree > 1]


def check_sequence(checked: CheckedGraph, configs: Configs, sizing: RequestParams) -> list[Problem]:
    """Every Ulysses node against the model's heads and the tokens of the graph's requests, defaults and limits."""
    loaded, family = checked.loaded, checked.family
    task, lines = loaded.spec.model.task, loaded.lines
    problems = []
    for name, node in loaded.spec.nodes.items():
        if node.parallel is None or node.parallel.ulysses == 1:
            continue
        where = ("nodes", name, "parallel", "ulysses")
        degree = node.parallel.ulysses
        requests: list[tuple[str, RequestParams]] = [(f"request {i + 1}", r) for i, r in enumerate(checked.requests)]
        requests.append(("the largest request (limits and defaults)", sizing))
        for what, request in requests:
            problem = sequence_problem(family, task, configs, request, degree)
            if problem is not None:
                problems.append(lines.problem(where, f"{what}: {problem}"))
                break
    return problems


def sequence_problem(family: ModelFamily, task: str, configs: Configs, request: RequestParams, degree: int) -> str | None:
    """Why ``request`` cannot run with Ulysses of ``degree`` on this model, None when it can."""
    shape = family.sequence_shape(task, configs, request)
    if shape is None:
        return family.split_refusal("ulysses")
    if shape.heads % degree:
        return f"the transformer's {shape.heads} attention heads do not split over ulysses {degree}"
    if shape.tokens % degree:
        return (f"its {shape.tokens} {family.name} DiT tokens do not split over ulysses {degree} "
                f"(choose a size whose token count divides by {degree})")
    return None

