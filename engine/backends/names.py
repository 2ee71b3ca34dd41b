"""Which backends run exported graphs, and why a stage falls back: plain data, no heavy import. (The backend names
themselves are the graph schema's ``Backend``.)"""

from __future__ import annotations

from enum import Enum

from engine.errors import EngineError

#: Backends that run a graph exported by the family's recipe (and so serve only ``exportable`` stages).
GRAPH_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class Reason(str, Enum):
    """Why a backend did not run a stage."""

    IMPORT_ERROR = "import_error"  #: its Python package is not installed or does not import
    PROBE_FAILED = "probe_failed"  #: it imports but cannot run on the node's device
    ARTIFACT_MISSING = "artifact_missing"  #: nothing built for this stage, and building on first use is off
    ARTIFACT_STALE = "artifact_stale"  #: built for other weights, recipe, version or device; building is off
    BUILD_FAILED = "build_failed"  #: exporting or building the artifact raised
    SHAPE_UNSUPPORTED = "shape_unsupported"  #: no artifact of this shape (building is off) or a shape it cannot take
    LOAD_OOM = "load_oom"  #: out of memory while loading the artifact
    RUN_ERROR = "run_error"  #: it raised while running a request
    PARITY_FAILED = "parity_failed"  #: its output differs from eager beyond tolerance


#: Reasons that hold for every shape: the stage stops asking that backend.
BACKEND_WIDE = frozenset({Reason.IMPORT_ERROR, Reason.PROBE_FAILED, Reason.RUN_ERROR})


class BackendFailure(EngineError):
    """A backend could not run a stage's work, for ``reason``; the stage tries the next backend of its chain."""

    def __init__(self, reason: Reason, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


class StrictBackendError(EngineError):
    """A strict node's stage could not run on its first backend."""
