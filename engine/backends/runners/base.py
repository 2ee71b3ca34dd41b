"""What every graph backend's runner does."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.backends.cache import Range
from engine.backends.faults import injected

#: A loaded artifact: the input tensors in (in the recipe's order), the output tensors out.
Session = Callable[..., tuple[torch.Tensor, ...]]


class GraphRunner(ABC):
    name: ClassVar[str]

    def probe(self, device: str, precision: str) -> str:
        """Import the runtime and check it can run on ``device`` in ``precision``; return its version. Raises
        ImportError (import_error) or BackendFailure (probe_failed)."""
        if injected("import_error", self.name):
            raise ImportError(f"{self.name} made unimportable by ENGINE_BACKEND_FAULTS")
        return self._probe(device, precision)

    @abstractmethod
    def _probe(self, device: str, precision: str) -> str: ...

    @abstractmethod
    def build(self, onnx: Path, folder: Path, device: str, precision: str, dynamic: Range | None) -> tuple[str, ...]:
        """Build the artifact from the ONNX graph at ``onnx`` into ``folder``; return the files written. ``dynamic``:
        the range of sizes a graph with dynamic axes must serve (None: the graph is static)."""

    @abstractmethod
    def load(self, folder: Path, device: str, precision: str, output_count: int) -> Session:
        """Load a built artifact, ready to run."""


def cpu_threads() -> int:
    """Threads a runtime's pool gets: torch's count, which the worker sets from the node's share of the cores (a
    runtime's own default, every core, would starve the torch work beside it)."""
    return max(1, torch.get_num_threads())


def to_numpy(tensors: tuple[torch.Tensor, ...]) -> list[Any]:
    return [t.detach().contiguous().cpu().numpy() for t in tensors]
