"""One runner per graph backend: probe the device, build an artifact from an ONNX export, load it to run."""

from __future__ import annotations

from engine.backends.runners.base import GraphRunner, Session


def graph_runner(backend: str) -> GraphRunner:
    """The runner of a graph backend (onnxruntime, openvino, tensorrt); its heavy imports happen on probe."""
    if backend == "onnxruntime":
        from engine.backends.runners.ort_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner()
    if backend == "openvino":
        from engine.backends.runners.openvino_runner import OpenVinoRunner

        return OpenVinoRunner()
    if backend == "tensorrt":
        from engine.backends.runners.tensorrt_runner import TensorRtRunner

        return TensorRtRunner()
    raise ValueError(f"{backend!r} is not a graph backend")


__all__ = ["GraphRunner", "Session", "graph_runner"]
