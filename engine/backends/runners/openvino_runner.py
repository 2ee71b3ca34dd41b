"""OpenVINO: the artifact is the exported graph converted to OpenVINO's IR (CPU here; its GPU plugin on xpu:N)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.backends.cache import Range
from engine.backends.names import BackendFailure, Reason
from engine.backends.runners.base import GraphRunner, Session, cpu_threads, to_numpy

MODEL = "model.xml"
_PRECISION_HINT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class OpenVinoRunner(GraphRunner):
    name = "openvino"

    def _probe(self, device: str, precision: str) -> str:
        import openvino

        target = self._device(device)
        available = openvino.Core().available_devices
        if target not in available:
            raise BackendFailure(Reason.PROBE_FAILED, f"OpenVINO has no {target} device (available: {', '.join(available)})")
        return openvino.get_version()

    @staticmethod
    def _device(device: str) -> str:
        if device == "cpu":
            return "CPU"
        if device.startswith("xpu"):
            return f"GPU.{torch.device(device).index or 0}"
        raise BackendFailure(Reason.PROBE_FAILED, f"OpenVINO does not run on {device}")

    def build(self, onnx: Path, folder: Path, device: str, precision: str, dynamic: Range | None) -> tuple[str, ...]:
        import openvino

        model = openvino.Core().read_model(str(onnx))
        openvino.save_model(model, str(folder / MODEL), compress_to_fp16=False)
        return tuple(sorted(p.name for p in folder.iterdir()))

    def load(self, folder: Path, device: str, precision: str, output_count: int) -> Session:
        import openvino

        config = {"INFERENCE_NUM_THREADS": cpu_threads(), "INFERENCE_PRECISION_HINT": _PRECISION_HINT[precision]}
        compiled = openvino.Core().compile_model(str(folder / MODEL), self._device(device), config)
        request = compiled.create_infer_request()
        target = torch.device(device)

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            results = request.infer(to_numpy(tensors))
            return tuple(torch.from_numpy(results[compiled.output(i)].copy()).to(target) for i in range(output_count))

        return run
