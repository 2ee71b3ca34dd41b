"""What the tensorrt runner hands TensorRT for a dynamic artifact, on a stand-in ``tensorrt`` module that records
the calls: one optimisation profile whose min, opt and max shapes are the manifest's range. (No GPU nor TensorRT
here: this checks the engine's side of the call, not TensorRT's answer; the real build has not run.)"""

from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace

import torch

from engine.backends.cache import Range
from engine.backends.runners.tensorrt_runner import ENGINE, TensorRtRunner


class Recorder:
    """Any attribute is a callable that records its call and answers with another recorder (or a set value)."""

    def __init__(self, log: list, name: str, **answers):
        self._log, self._name, self._answers = log, name, answers

    def __getattr__(self, attribute: str):
        if attribute in self._answers:
            return self._answers[attribute]

        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attribute}", args))
            return Recorder(self._log, attribute)
        return call


def stand_in_tensorrt(calls: list) -> SimpleNamespace:
    network = Recorder(calls, "network", num_inputs=1, get_input=lambda index: SimpleNamespace(name="latents"))
    builder = Recorder(calls, "builder", create_network=lambda flags: network,
                       build_serialized_network=lambda net, config: b"engine bytes")
    return SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 1, "__init__": lambda self, level: None}), Builder=lambda logger: builder,
        OnnxParser=lambda net, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), BuilderFlag=SimpleNamespace(FP16="fp16", BF16="bf16"))


def test_a_dynamic_artifact_is_built_with_one_profile_from_its_range(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt(calls))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    profile = Range(axes=((3, 4),), smallest=((1, 16, 1, 2, 2),), optimal=((1, 16, 1, 8, 12),),
                    largest=((1, 16, 1, 16, 16),))

    files = TensorRtRunner().build(tmp_path / "model.onnx", tmp_path, "cuda:0", "float32", profile)

    assert files == (ENGINE,) and (tmp_path / ENGINE).read_bytes() == b"engine bytes"
    assert ("create_optimization_profile.set_shape",
            ("latents", (1, 16, 1, 2, 2), (1, 16, 1, 8, 12), (1, 16, 1, 16, 16))) in calls
    assert [name for name, _ in calls].count("create_builder_config.add_optimization_profile") == 1
    calls.clear()
    TensorRtRunner().build(tmp_path / "model.onnx", tmp_path, "cuda:0", "float32", None)  # static: no profile
    assert not [name for name, _ in calls if "optimization_profile" in name]
