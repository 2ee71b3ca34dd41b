"""``compile``: torch.compile of the stage's work, in place.

With the family's export recipes it compiles each recipe's module and installs it where the stage makes that
call (so ``vae.decode()`` runs compiled, not a ``forward`` the stage never calls). Without recipes (a DiT) it
compiles the ``forward`` of every module the stage holds. Either way the first call at each input signature also
runs eager on the same inputs and must pass the parity gate (fp32: max abs; half precision: cosine and PSNR); one
that fails is ``parity_failed``: the request runs eager, and so does every later one with that signature.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from engine.backends.faults import injected
from engine.backends.graph import PARITY_FAULT, as_tuple, precision_of, shapes_text, signatures
from engine.backends.names import BackendFailure, Reason
from engine.backends.parity import parity
from engine.backends.recipe import ExportRecipe, TensorSig
from engine.backends.usage import Meter
from engine.stepcache.blocks import ACTIVE_PASS

log = logging.getLogger("engine.backends")


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


class Gated:
    """A compiled call, checked against its eager call at its first call with each input signature: the parity gate
    (the same inputs through both; one that fails raises ``parity_failed`` then and at every later call with that
    signature, and the stage runs the request eager)."""

    def __init__(self, eager: Callable[..., Any], precision: str, meter: Callable[[], Meter]):
        self.eager, self.precision, self.meter = eager, precision, meter
        self.compiled = _guarded(torch.compile(eager))
        self.checked: dict[tuple[TensorSig, ...], BackendFailure | None] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = signatures(tuple(leaf for leaf in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(leaf)))
        failure = self.checked.get(inputs)
        if failure is not None:
            raise failure
        started = time.perf_counter()
        outputs = self.compiled(*args, **kwargs)
        elapsed = time.perf_counter() - started
        meter = self.meter()
        if inputs in self.checked:
            meter.run_ms += elapsed * 1e3
            return outputs
        meter.build_s += elapsed  # the first call at this signature compiled it
        expected = contextvars.copy_context().run(self._reference, args, kwargs)
        actual = _tensors(outputs)
        if injected("parity", "compile"):
            actual = tuple(t + PARITY_FAULT for t in actual)
        figures = parity(_tensors(expected), actual, self.precision)
        if meter.parity is None or not figures.passed or figures.max_abs > meter.parity.max_abs:
            meter.parity = figures  # the worst of the stage's compiled calls
        self.checked[inputs] = None if figures.passed else BackendFailure(
            Reason.PARITY_FAILED, f"max abs {figures.max_abs:.3g}, cosine {figures.cosine:.6f}, PSNR "
            f"{figures.psnr_db:.1f} dB against eager at inputs {shapes_text(inputs)}; needs {figures.threshold}")
        if not figures.passed:
            log.warning("compile: %s", self.checked[inputs])
            raise self.checked[inputs]  # type: ignore[misc]
        return outputs

    def _reference(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The eager call on the same inputs, outside any step-cache pass (its blocks must not decide, nor count,
        twice for one transformer call)."""
        ACTIVE_PASS.set(None)
        with torch.no_grad():
            return self.eager(*args, **kwargs)


def _tensors(outputs: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a call's outputs (a tensor, a tuple, a diffusers output dataclass), in order."""
    if hasattr(outputs, "to_tuple"):  # diffusers' BaseOutput
        outputs = outputs.to_tuple()
    return tuple(leaf for leaf in pytree.tree_leaves(outputs) if torch.is_tensor(leaf))


class Compiled:
    """The compile backend of one stage: install before a request runs, restore after. With the family's recipes,
    each recipe's call compiled; else each module's ``forward`` (a DiT), each gated against eager."""

    def __init__(self, recipes: tuple[ExportRecipe, ...], modules: list[torch.nn.Module], meter: Callable[[], Meter]):
        self.recipes = [(recipe, Gated(recipe.module, precision_of(recipe.module), meter)) for recipe in recipes]
        self.modules = [] if recipes else modules
        self.forwards = {id(m): Gated(m.forward, precision_of(m), meter) for m in self.modules}
        self.restores: list[Callable[[], None]] = []

    def install(self) -> None:
        for recipe, gated in self.recipes:
            self.restores.append(recipe.install(lambda *tensors, gated=gated: as_tuple(gated(*tensors))))
        for module in self.modules:
            module.forward = self.forwards[id(module)]
            self.restores.append(lambda module=module: vars(module).pop("forward", None))

    def restore(self) -> None:
        while self.restores:
            self.restores.pop()()
