"""What a worker expects on each of its inbound edges for one request: the plan's declarations, evaluated.

The worker spec carries every inbound tensor as the plan declares it (dtype, shape expression) and the
model's configs; a delivery carries its request's parameters. The family gives the symbols for those
parameters and these configs, exactly as the planner sized the edges with them, so the expected shapes
are the ones a correct sender produces for this request: a manifest that differs is refused at delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.plan.shapes import evaluate_shape
from engine.worker.contract import WorkerSpec
from engine.stages import ModelFamily
from engine.transport.expect import Expected


class InboundShapes:
    def __init__(self, spec: WorkerSpec, family: ModelFamily):
        self.spec = spec
        self.family = family
        self.declared = {edge.name: edge.declared for edge in spec.inbound}

    def expected(self, edge: str, request: Mapping[str, Any]) -> tuple[Expected, ...]:
        """The tensors ``edge`` must carry for a request with parameters ``request`` (as dispatched)."""
        params = self.family.request_type(self.spec.task).model_validate(request)
        symbols = self.family.shape_symbols(self.spec.task, self.spec.configs, params)
        return tuple(Expected(t.name, t.dtype, evaluate_shape(t.expression, symbols), t.optional, t.variable)
                     for t in self.declared[edge])
