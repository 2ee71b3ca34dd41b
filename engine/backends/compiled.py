"""``compile``: torch.compile of the stage's work, in place.

With the family's export recipes it compiles each recipe's module and installs it where the stage makes that
call (so ``vae.decode()`` runs compiled, not a ``forward`` the stage never calls); the first call at each input
shape also runs eager and must pass the parity gate. Without recipes (a DiT) it compiles the ``forward`` of
every module the stage holds.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.backends.faults import injected
from engine.backends.graph import as_tuple, precision_of, signatures
from engine.backends.names import BackendFailure, Reason
from engine.backends.parity import parity
from engine.backends.recipe import ExportRecipe, TensorSig
from engine.backends.usage import Meter


def probe_compile(device: str) -> str:
    """torch.compile needs a C++ compiler for CPU kernels and Triton for GPU ones."""
    if injected("import_error", "compile"):
        raise ImportError("torch.compile made unimportable by ENGINE_BACKEND_FAULTS")
    if device.startswith(("cuda", "xpu")):
        if importlib.util.find_spec("triton") is None:
            raise BackendFailure(Reason.PROBE_FAILED, f"torch.compile on {device} needs Triton, which is not installed")
    elif shutil.which("g++") is None and shutil.which("c++") is None:
        raise BackendFailure(Reason.PROBE_FAILED, "torch.compile on the CPU needs a C++ compiler (g++); none is on PATH")
    return torch.__version__


def _guarded(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` whose failures become run errors of this backend (the stage then runs the request eager)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            if injected("run_error", "compile"):
                raise RuntimeError("run error injected by ENGINE_BACKEND_FAULTS")
            return call(*args, **kwargs)
        except BackendFailure:
            raise
        except Exception as exc:  # a compiler or kernel error of any kind: not the request's fault
            raise BackendFailure(Reason.RUN_ERROR, f"{type(exc).__name__}: {exc}") from exc

    return run


class CompiledRecipe:
    """One recipe's call compiled; checked against eager at the first call of each input shape."""

    def __init__(self, recipe: ExportRecipe, meter: Callable[[], Meter]):
        self.recipe = recipe
        self.compiled = torch.compile(recipe.module)
        self.meter = meter
        self.checked: dict[tuple[TensorSig, ...], BackendFailure | None] = {}

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = signatures(tensors)
        failure = self.checked.get(inputs)
        if failure is not None:
            raise failure
        started = time.perf_counter()
        outputs = as_tuple(_guarded(self.compiled)(*tensors))
        elapsed = time.perf_counter() - started
        meter = self.meter()
        if inputs not in self.checked:  # first call at this shape: it compiled, and must match eager
            meter.build_s += elapsed
            figures = parity(as_tuple(self.recipe.module(*tensors)), outputs, precision_of(self.recipe.module))
            meter.parity = figures
            self.checked[inputs] = None if figures.passed else BackendFailure(
                Reason.PARITY_FAILED, f"max abs {figures.max_abs:.3g} against eager; needs {figures.threshold}")
            if not figures.passed:
                raise self.checked[inputs]  # type: ignore[misc]
        else:
            meter.run_ms += elapsed * 1e3
        return outputs


class Compiled:
    """The compile backend of one stage: install before a request runs, restore after."""

    def __init__(self, recipes: tuple[ExportRecipe, ...], modules: list[torch.nn.Module], meter: Callable[[], Meter]):
        self.recipes = [CompiledRecipe(recipe, meter) for recipe in recipes]
        self.modules = [] if recipes else modules
        self.forwards = {id(m): _guarded(torch.compile(m.forward)) for m in self.modules}
        self.restores: list[Callable[[], None]] = []

    def install(self) -> None:
        for compiled in self.recipes:
            self.restores.append(compiled.recipe.install(compiled))
        for module in self.modules:
            module.forward = self.forwards[id(module)]
            self.restores.append(lambda module=module: vars(module).pop("forward", None))

    def restore(self) -> None:
        while self.restores:
            self.restores.pop()()
