"""Fault injection on the sending side of an edge, for tests of the integrity, fencing and shape paths.

A sender hashes the bytes as they should arrive, then applies the faults: a delay holds the write back, a
drop keeps the bytes from moving, a corruption flips one bit in the slot after the bytes landed. A misshape
sends the first non-empty tensor one element short in its last dimension, bytes, headers and digest
agreeing: a sender that computed the wrong shape. Each is something the receiver must catch or the
sender's watchdog must report. Faults are counted down: each write consumes at most one of each kind.
Tests set them on a sender directly; runtime tests set them for a whole process through
``ENGINE_TRANSPORT_FAULTS``, a JSON object like
``{"corrupt": 1, "drop": 0, "delay": 1, "delay_s": 2.0, "misshape": 1, "edges": ["phase1"]}`` (``edges`` empty
or absent: every edge).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.transport.manifest import TensorHeader

ENV_VAR = "ENGINE_TRANSPORT_FAULTS"


class FaultPlan(BaseModel):
    """How many of the next writes to corrupt, drop or delay."""

    model_config = ConfigDict(extra="forbid")

    corrupt: int = Field(0, ge=0, description="next writes that get one bit flipped in the slot after they land")
    drop: int = Field(0, ge=0, description="next writes whose bytes are never written")
    delay: int = Field(0, ge=0, description="next writes held back by delay_s before the bytes move")
    delay_s: float = Field(0.0, ge=0, description="how long a delayed write is held back")
    misshape: int = Field(
        0, ge=0, description="next writes that send their first non-empty tensor one element short in its last dimension")
    edges: tuple[str, ...] = Field((), description="edges the plan applies to; empty means every edge")
    seed: int | None = Field(None, description="seed for the flipped bit's position")


class Faults:
    """The faults still to inject on one edge's sender."""

    def __init__(self, plan: FaultPlan | None = None):
        self.plan = plan or FaultPlan()
        self._random = random.Random(self.plan.seed)
        self.injected: list[str] = []  # what was done, for assertions: "corrupt@<byte>.<bit>", "drop", "delay"

    @classmethod
    def from_env(cls, edge: str) -> Faults:
        """The faults ``ENGINE_TRANSPORT_FAULTS`` asks for on ``edge`` (none if unset or for other edges)."""
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        plan = FaultPlan.model_validate_json(raw)
        return cls(plan if not plan.edges or edge in plan.edges else None)

    @property
    def armed(self) -> bool:
        """Whether any fault is still to be injected."""
        return bool(self.plan.corrupt or self.plan.drop or self.plan.delay or self.plan.misshape)

    def arm(
        self, *, corrupt: int = 0, drop: int = 0, delay: int = 0, delay_s: float | None = None, misshape: int = 0
    ) -> None:
        """Add faults to inject on the next writes."""
        update = {
            "corrupt": self.plan.corrupt + corrupt,
            "drop": self.plan.drop + drop,
            "delay": self.plan.delay + delay,
            "misshape": self.plan.misshape + misshape,
        }
        if delay_s is not None:
            update["delay_s"] = delay_s
        self.plan = self.plan.model_copy(update=update)

    def take_delay(self) -> float:
        """Seconds to hold this write back (0 when no delay is armed)."""
        if not self.plan.delay:
            return 0.0
        self.plan = self.plan.model_copy(update={"delay": self.plan.delay - 1})
        self.injected.append("delay")
        return self.plan.delay_s

    def take_drop(self) -> bool:
        """Whether to drop this write."""
        if not self.plan.drop:
            return False
        self.plan = self.plan.model_copy(update={"drop": self.plan.drop - 1})
        self.injected.append("drop")
        return True

    def take_misshape(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``tensors`` to send: as they are, or, if a misshape is armed, with the first non-empty one cut one
        element short in its last dimension."""
        name = next((name for name, tensor in tensors.items() if tensor.dim() and tensor.shape[-1]), None)
        if not self.plan.misshape or name is None:
            return tensors
        self.plan = self.plan.model_copy(update={"misshape": self.plan.misshape - 1})
        self.injected.append(f"misshape@{name}")
        return {**tensors, name: tensors[name][..., :-1].contiguous()}

    def take_corruption(self, headers: Sequence[TensorHeader]) -> tuple[int, int] | None:
        """``(payload byte, bit)`` to flip in the slot after this write, if a corruption is armed.

        The bit is picked among the tensors' bytes, never in alignment gaps (which nothing reads).
        """
        total = sum(h.nbytes for h in headers)
        if not self.plan.corrupt or total == 0:
            return None
        self.plan = self.plan.model_copy(update={"corrupt": self.plan.corrupt - 1})
        pick, bit = self._random.randrange(total), self._random.randrange(8)
        for header in headers:
            if pick < header.nbytes:
                byte = header.offset + pick
                break
            pick -= header.nbytes
        self.injected.append(f"corrupt@{byte}.{bit}")
        return byte, bit
