"""ONNX Runtime: the artifact is the exported graph as ONNX Runtime optimised it for this machine."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.backends.cache import Range
from engine.backends.names import BackendFailure, Reason
from engine.backends.runners.base import GraphRunner, Session, cpu_threads, to_numpy

MODEL = "model.onnx"


class OnnxRuntimeRunner(GraphRunner):
    name = "onnxruntime"

    def _probe(self, device: str, precision: str) -> str:
        import onnxruntime

        if precision == "bfloat16":
            raise BackendFailure(Reason.PROBE_FAILED, "onnxruntime takes float32 or float16 inputs; this stage runs bfloat16")
        provider = self._provider(device)
        if provider not in onnxruntime.get_available_providers():
            raise BackendFailure(Reason.PROBE_FAILED, f"onnxruntime {onnxruntime.__version__} has no {provider} "
                                 f"(available: {', '.join(onnxruntime.get_available_providers())})")
        return onnxruntime.__version__

    @staticmethod
    def _provider(device: str) -> str:
        if device == "cpu":
            return "CPUExecutionProvider"
        if device.startswith("cuda"):
            return "CUDAExecutionProvider"
        raise BackendFailure(Reason.PROBE_FAILED, f"onnxruntime does not run on {device}")

    def _options(self, device: str):  # noqa: ANN202 - onnxruntime.SessionOptions
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        # Spinning threads between calls would steal the cores torch works on in the same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _providers(self, device: str) -> list:
        provider = self._provider(device)
        if provider == "CUDAExecutionProvider":
            index = torch.device(device).index or 0
            return [(provider, {"device_id": index}), "CPUExecutionProvider"]
        return [provider]

    def build(self, onnx: Path, folder: Path, device: str, precision: str, dynamic: Range | None) -> tuple[str, ...]:
        import onnxruntime

        options = self._options(device)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(folder / MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{MODEL}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        onnxruntime.InferenceSession(str(onnx), options, providers=self._providers(device))
        return tuple(sorted(p.name for p in folder.iterdir()))

    def load(self, folder: Path, device: str, precision: str, output_count: int) -> Session:
        import onnxruntime

        options = self._options(device)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised when built
        session = onnxruntime.InferenceSession(str(folder / MODEL), options, providers=self._providers(device))
        names = [i.name for i in session.get_inputs()]
        target = torch.device(device)

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = session.run(None, dict(zip(names, to_numpy(tensors))))
            return tuple(torch.from_numpy(o).to(target) for o in outputs)

        return run
