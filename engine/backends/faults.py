"""Fault injection for tests: ``ENGINE_BACKEND_FAULTS`` makes a backend fail for real where the name says.

``{"load_oom": ["onnxruntime"], "run_error": ["openvino"], "parity": ["onnxruntime"], "import_error": ["openvino"]}``:
a MemoryError when loading an onnxruntime artifact, an error when running an openvino one, an onnxruntime artifact
whose output is off by 1e-2 in the parity gate, openvino's import raising ImportError. ``compile`` takes
``import_error``, ``run_error`` and ``parity`` (its compiled calls, a DiT's forward too, off by 1e-2 in its gate).
"""

from __future__ import annotations

import json
import os

from engine.errors import EngineError

FAULTS_ENV = "ENGINE_BACKEND_FAULTS"
KINDS = ("import_error", "load_oom", "run_error", "parity")


def _faults() -> dict[str, frozenset[str]]:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return {}
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{FAULTS_ENV} is not JSON: {exc}") from exc
    unknown = set(faults) - set(KINDS)
    if unknown:
        raise EngineError(f"{FAULTS_ENV}: unknown faults {sorted(unknown)}; expected {', '.join(KINDS)}")
    return {kind: frozenset(backends) for kind, backends in faults.items()}


def injected(kind: str, backend: str) -> bool:
    """Whether the environment asks ``backend`` to fail with ``kind``."""
    return backend in _faults().get(kind, ())
