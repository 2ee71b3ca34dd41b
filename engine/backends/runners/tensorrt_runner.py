"""TensorRT: the artifact is a serialized engine built from the exported graph, on a CUDA GPU: for one input shape,
or, for a graph with dynamic axes, with one optimisation profile whose min, opt and max shapes are the manifest's
range (smallest, optimal, largest), so that one engine serves every size within the graph's limits.

The engine's key holds TensorRT's version and the GPU's SM, driver and CUDA (``engine.backends.identity``): an
engine built elsewhere is stale and rebuilt, never deserialized here.

Not yet run on a GPU: no machine this was developed on had one (nor TensorRT), so the optimisation profile and the
input shapes set per call follow TensorRT's documented Python API untested; only the fallback on a machine without
TensorRT (import_error, probe_failed) is tested.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.backends.cache import Range
from engine.backends.names import BackendFailure, Reason
from engine.backends.runners.base import GraphRunner, Session

ENGINE = "model.plan"
WORKSPACE_BYTES = 4 << 30


class TensorRtRunner(GraphRunner):
    name = "tensorrt"

    def _probe(self, device: str, precision: str) -> str:
        import tensorrt

        if not device.startswith("cuda"):
            raise BackendFailure(Reason.PROBE_FAILED, f"TensorRT runs on CUDA GPUs; this node is on {device}")
        if not torch.cuda.is_available():
            raise BackendFailure(Reason.PROBE_FAILED, "TensorRT imports but torch sees no CUDA device")
        return tensorrt.__version__

    def build(self, onnx: Path, folder: Path, device: str, precision: str, dynamic: Range | None) -> tuple[str, ...]:
        import tensorrt

        logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        builder = tensorrt.Builder(logger)
        network = builder.create_network(0)
        parser = tensorrt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse the ONNX graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(tensorrt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if dynamic is not None:  # untested on a GPU (see the module's docstring)
            shapes = builder.create_optimization_profile()
            for index in range(network.num_inputs):
                shapes.set_shape(network.get_input(index).name, dynamic.smallest[index], dynamic.optimal[index],
                                 dynamic.largest[index])
            config.add_optimization_profile(shapes)
        if precision == "float16":
            config.set_flag(tensorrt.BuilderFlag.FP16)
        elif precision == "bfloat16":
            config.set_flag(tensorrt.BuilderFlag.BF16)
        with torch.cuda.device(torch.device(device)):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT built no engine (see its log above)")
        (folder / ENGINE).write_bytes(bytes(serialized))
        return (ENGINE,)

    def load(self, folder: Path, device: str, precision: str, output_count: int) -> Session:
        import tensorrt

        target = torch.device(device)
        runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        with torch.cuda.device(target):
            engine = runtime.deserialize_cuda_engine((folder / ENGINE).read_bytes())
            if engine is None:
                raise MemoryError("TensorRT could not deserialize the engine (device memory)")
            context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.OUTPUT]
        dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in outputs}

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            stream = torch.cuda.current_stream(target)
            held = [t.to(target).contiguous() for t in tensors]
            for name, tensor in zip(inputs, held):
                context.set_input_shape(name, tuple(tensor.shape))  # a dynamic engine's shapes for this call
                context.set_tensor_address(name, tensor.data_ptr())
            results = []
            for name in outputs:
                result = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[name], device=target)
                context.set_tensor_address(name, result.data_ptr())
                results.append(result)
            if not context.execute_async_v3(stream.cuda_stream):
                raise BackendFailure(Reason.RUN_ERROR, "TensorRT's execute_async_v3 returned false")
            stream.synchronize()
            return tuple(results)

        return run


def _torch_dtype(dtype) -> torch.dtype:  # noqa: ANN001 - tensorrt.DataType
    import tensorrt

    return {tensorrt.float32: torch.float32, tensorrt.float16: torch.float16, tensorrt.bfloat16: torch.bfloat16,
            tensorrt.int64: torch.int64, tensorrt.int32: torch.int32}[dtype]
