"""A graph planned as a cluster runs it: every node on its pod, the graph the serving head will load, and the
plan it will make of it, so that what each pod requests is the plan's own figures.

The graph the serving head runs is the user's, with the user's ``--set`` applied and then: each node placed on its
pod (:mod:`engine.deploy.pods`), the broker the pods share, the model at its path in the model volume, the edges'
size limits fixed at the sizes planned here, a service's (:func:`engine.plan.build.check_service_graph`: the graph's
limits, else its request defaults), so the head sizes its buffers exactly as these requests assume and refuses a
larger request, and no requests of its own (the head takes them over HTTP).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.deploy.pods import Pod, PodResources, assign_pods, placement_overrides, pod_resources
from engine.plan.build import build_plan, check_service_graph, sizing_request
from engine.plan.model_check import model_source
from engine.plan.feeder import DEFAULT_FILE_BYTES
from engine.plan.check import check_graph
from engine.plan.memory import memory_report
from engine.plan.model import Plan
from engine.spec.load import load_graph


@dataclass(frozen=True)
class ClusterPlan:
    plan: Plan  #: the plan the serving head will make (nodes on their pods, buffers at the fixed limits)
    pods: tuple[Pod, ...]  #: the serving head first
    resources: dict[str, PodResources]  #: pod name -> what it requests
    graph: dict[str, Any]  #: the graph document the serving head runs


def plan_for_cluster(graph: Path, overrides: Sequence[str], *, broker: str, models_dir: str, model_path: str | None,
                     headroom_bytes: int) -> ClusterPlan:
    """Plan ``graph`` for a cluster whose pods share ``broker`` and see models under ``models_dir``: the model's
    folder there is ``model_path``, by default the last part of the graph's ``model.path``. The model's configs are
    read here from the graph's own ``model.path`` (a preset is built on first use)."""
    checked = check_service_graph(graph, overrides)
    model = checked.loaded.spec.model
    model_path = model_path or str(PurePosixPath(models_dir) / PurePosixPath(model.path).name)
    pods = assign_pods(checked)
    sizing = sizing_request(checked)
    cluster = [*overrides, *placement_overrides(pods), "requests=[]",
               *(f"limits.{name}={getattr(sizing, name)}" for name in type(sizing).size_fields),
               f"broker={json.dumps(broker)}", f"model.path={json.dumps(model_path)}"]
    placed = check_graph(load_graph(graph, cluster))
    source = model_source(checked, build=True)
    plan = build_plan(placed, source, input_file_bytes=DEFAULT_FILE_BYTES)  # the head's uploads reach other pods
    report = memory_report(plan, placed.family, source)
    return ClusterPlan(plan, pods, {pod.name: pod_resources(pod, plan, report, headroom_bytes) for pod in pods},
                       placed.loaded.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True))
