"""Stage backends on a small VAE-like module: every fallback reason for real, the artifact cache's keys and
manifests, the resident LRU, strict nodes, and each CPU backend within tolerance of eager."""

from __future__ import annotations

import json

from typing import ClassVar

import pytest
import torch
from pydantic import Field
from diffusers.models.autoencoders.vae import DecoderOutput

from engine.backends.cache import ArtifactCache, read_manifest
from engine.backends.chain import BackendStage, stage_uses, with_backends
from engine.backends.modules import UnboundCall
from engine.backends.names import StrictBackendError
from engine.backends.recipe import ExportRecipe, TensorSig, replace_method
from engine.controller.tracker import TrackedRequest
from engine.serve.metrics import ServiceMetrics
from engine.stages import LoadedComponents, RequestParams, Stage, StageSpec, TensorSpec


class ToyVae(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        image = torch.tanh(self.conv(torch.nn.functional.interpolate(z, scale_factor=2.0)))
        return DecoderOutput(sample=image) if return_dict else (image,)


class Size(RequestParams):
    size_fields: ClassVar[tuple[str, ...]] = ("side",)
    side: int = Field(4, ge=2)


SPEC = StageSpec("vae_decode", components=("vae_decoder",), inputs=("latents",),
                 outputs=(TensorSpec("image", "float32", (1, 3, "h", "w")),), exportable=True)


class ToyStage(Stage):
    spec = SPEC

    def __init__(self, vae: ToyVae):
        self.vae = vae

    def run(self, request, inputs, progress):
        return {"image": self.vae.decode(inputs["latents"], return_dict=False)[0] * 0.5 + 0.5}


class ToyFamily:
    """What with_backends asks of a family: the stage's export recipes (with ``dynamic``: over the latents' height
    and width) and, for dynamic ones, its request type."""

    def __init__(self, version: int = 1, dynamic: bool = False):
        self.version = version
        self.dynamic = ((2, 3),) if dynamic else ()

    def request_type(self, task: str) -> type[Size]:
        return Size

    def export_recipes(self, task: str, stage: ToyStage) -> tuple[ExportRecipe, ...]:
        vae = stage.vae

        def install(call):
            return replace_method(vae, "decode", lambda z, return_dict=True: (call(z)[0],))

        return (ExportRecipe("decode", self.version, UnboundCall(vae, "decode"), ("latents",), ("image",),
                             lambda request: (TensorSig((1, 4, request.side, request.side), "float32"),), install,
                             dynamic=self.dynamic),)


def latents(side: int = 4) -> torch.Tensor:
    return torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side))


def make(chain, *, strict=False, vae=None, family=None, limits=None) -> BackendStage:
    vae = vae or ToyVae()
    stage = with_backends(ToyStage(vae), family or ToyFamily(), "t2i", "decoder", tuple(chain), strict,
                          LoadedComponents({"vae_decoder": vae}), "cpu", "/models/toy", limits)
    assert isinstance(stage, BackendStage)
    return stage


def run(stage: BackendStage, side: int = 4) -> tuple[torch.Tensor, dict]:
    image = stage.run(Size(side=side), {"latents": latents(side)}, lambda step, total: None)["image"]
    return image, stage_uses({"vae_decode": stage}, ("vae_decode",))["vae_decode"]


def eager(side: int = 4) -> torch.Tensor:
    return ToyStage(ToyVae()).run(Size(side=side), {"latents": latents(side)}, None)["image"]


def reasons(use: dict) -> list[tuple[str, str | None]]:
    return [(step["backend"], step["reason"]) for step in use["chain"]]


@pytest.fixture(autouse=True)
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.delenv("ENGINE_BACKEND_FAULTS", raising=False)
    monkeypatch.delenv("ENGINE_BACKEND_BUILD", raising=False)
    monkeypatch.delenv("ENGINE_BACKEND_RESIDENT", raising=False)
    return tmp_path / "artifacts"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_backend_runs_within_tolerance_and_says_so(backend):
    stage = make([backend, "eager"])
    image, use = run(stage)
    assert (image - eager()).abs().max() <= 3e-4
    assert use["used"] == backend and reasons(use) == [(backend, None)] and use["cache"] == "built"
    assert use["parity"]["passed"] and use["parity"]["max_abs"] <= 3e-4 and backend in use["versions"]
    _, again = run(stage)
    assert again["cache"] == "resident" and again["build_s"] == 0 and again["run_ms"] > 0
    _, fresh = run(make([backend, "eager"]))  # another process: the artifact comes from the cache
    assert fresh["cache"] == "hit" and fresh["load_s"] > 0


def test_compile_runs_the_installed_call_within_tolerance():
    image, use = run(make(["compile", "eager"]))
    assert use["used"] == "compile" and use["parity"]["passed"] and (image - eager()).abs().max() <= 3e-4


def test_tensorrt_on_a_cpu_machine_falls_back_bit_exact():
    image, use = run(make(["tensorrt", "eager"]))
    assert reasons(use) == [("tensorrt", "import_error"), ("eager", None)] and use["asked"] == "tensorrt"
    assert torch.equal(image, eager())


@pytest.mark.parametrize("fault, reason", [("load_oom", "load_oom"), ("run_error", "run_error"),
                                           ("parity", "parity_failed"), ("import_error", "import_error")])
def test_each_injected_fault_falls_back_to_eager(fault, reason, monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND_FAULTS", json.dumps({fault: ["onnxruntime"]}))
    stage = make(["onnxruntime", "eager"])
    image, use = run(stage)
    assert reasons(use) == [("onnxruntime", reason), ("eager", None)] and torch.equal(image, eager())
    _, again = run(stage)  # the stage keeps its answer: the next request goes straight to eager
    assert reasons(again) == [("onnxruntime", reason), ("eager", None)] and again["build_s"] == 0


def test_a_failed_parity_gate_is_recorded_and_never_used(monkeypatch, artifacts):
    monkeypatch.setenv("ENGINE_BACKEND_FAULTS", json.dumps({"parity": ["onnxruntime"]}))
    run(make(["onnxruntime", "eager"]))
    (manifest_path,) = artifacts.glob("onnxruntime/vae_decode/*/manifest.json")
    assert read_manifest(manifest_path.parent).parity.passed is False
    monkeypatch.delenv("ENGINE_BACKEND_FAULTS")
    _, use = run(make(["onnxruntime", "eager"]))  # the same key: not rebuilt, still refused
    assert reasons(use)[0] == ("onnxruntime", "parity_failed") and use["build_s"] == 0


def test_a_build_that_cannot_write_falls_back(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ENGINE_ARTIFACT_DIR", str(tmp_path / "file" / "artifacts"))
    image, use = run(make(["openvino", "eager"]))
    assert reasons(use) == [("openvino", "build_failed"), ("eager", None)] and torch.equal(image, eager())


def test_without_building_missing_stale_and_unbuilt_shapes_fall_back(monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND_BUILD", "never")
    _, use = run(make(["onnxruntime", "eager"]))
    assert reasons(use)[0] == ("onnxruntime", "artifact_missing")
    monkeypatch.setenv("ENGINE_BACKEND_BUILD", "first_use")
    run(make(["onnxruntime", "eager"]), side=4)  # built for 4x4 only
    monkeypatch.setenv("ENGINE_BACKEND_BUILD", "never")
    image, use = run(make(["onnxruntime", "eager"]), side=6)
    assert reasons(use)[0][1] == "shape_unsupported" and "1x4x4x4" in use["chain"][0]["detail"]
    assert torch.equal(image, eager(6))
    _, use = run(make(["onnxruntime", "eager"], vae=ToyVae(seed=1)), side=4)  # other weights
    assert reasons(use)[0] == ("onnxruntime", "artifact_stale") and "weights" in use["chain"][0]["detail"]


def test_a_changed_weight_shape_or_recipe_version_rebuilds():
    assert run(make(["onnxruntime"]))[1]["cache"] == "built"
    assert run(make(["onnxruntime"]))[1]["cache"] == "hit"
    assert run(make(["onnxruntime"], vae=ToyVae(seed=1)))[1]["cache"] == "rebuilt (stale: weights)"
    assert run(make(["onnxruntime"], vae=ToyVae(seed=1), family=ToyFamily(version=2)))[1]["cache"] == \
        "rebuilt (stale: recipe_version)"
    assert run(make(["onnxruntime"]), side=6)[1]["cache"] == "built"  # another shape: another slot
    assert len(list(ArtifactCache().manifests("onnxruntime", "vae_decode", "/models/toy"))) == 2


@pytest.mark.parametrize("budget, third", [("1", "hit"), ("2", "resident")])
def test_resident_sizes_are_evicted_least_recently_used(budget, third, monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND_RESIDENT", budget)
    stage = make(["onnxruntime"])
    assert [run(stage, side)[1]["cache"] for side in (4, 6)] == ["built", "built"]
    assert run(stage, 4)[1]["cache"] == third  # 4 was evicted when 6 loaded, with room for one size
    assert run(stage, 4)[1]["cache"] == "resident"


def test_strict_fails_naming_stage_and_reason(monkeypatch):
    with pytest.raises(StrictBackendError, match=r"stage 'vae_decode' on node 'decoder': backend tensorrt failed with import_error"):
        make(["tensorrt", "eager"], strict=True)
    monkeypatch.setenv("ENGINE_BACKEND_FAULTS", json.dumps({"load_oom": ["openvino"]}))
    stage = make(["openvino", "eager"], strict=True)
    with pytest.raises(StrictBackendError, match="backend openvino failed with load_oom"):
        run(stage)


def test_the_eager_call_is_back_after_each_request():
    vae = ToyVae()
    stage = make(["onnxruntime"], vae=vae)
    run(stage)
    assert "decode" not in vars(vae)


class ToyDenoise(Stage):
    """A stage the family exports nothing of (a DiT): compile compiles its modules' forward in place."""

    spec = StageSpec("denoise", components=("transformer",), inputs=("latents",),
                     outputs=(TensorSpec("latents", "float32", (1, 4, "h", "w")),))

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.ran_compiled: list[bool] = []

    def run(self, request, inputs, progress):
        self.ran_compiled.append("forward" in vars(self.transformer))
        return {"latents": self.transformer(inputs["latents"])}


def test_compile_of_a_stage_without_recipes_compiles_its_modules_in_place():
    transformer = ToyVae().conv
    inner = ToyDenoise(transformer)
    stage = with_backends(inner, ToyFamily(), "t2i", "transformer", ("compile", "eager"), False,
                          LoadedComponents({"transformer": transformer}), "cpu", "/models/toy")
    out = stage.run(Size(), {"latents": latents()}, None)["latents"]
    assert inner.ran_compiled == [True] and "forward" not in vars(transformer)  # compiled for the run, restored after
    use = stage_uses({"denoise": stage}, ("denoise",))["denoise"]
    assert use["used"] == "compile" and use["parity"]["passed"] and use["parity"]["max_abs"] <= 3e-4
    assert (out - transformer(latents())).abs().max() <= 3e-4


def test_a_dit_whose_compiled_forward_fails_its_parity_gate_runs_eager(monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND_FAULTS", json.dumps({"parity": ["compile"]}))
    transformer = ToyVae().conv
    stage = with_backends(ToyDenoise(transformer), ToyFamily(), "t2i", "transformer", ("compile", "eager"), False,
                          LoadedComponents({"transformer": transformer}), "cpu", "/models/toy")
    details = []
    for _ in range(2):  # the second request is refused with the first one's figures: the gate's answer is kept
        out = stage.run(Size(), {"latents": latents()}, None)["latents"]
        use = stage_uses({"denoise": stage}, ("denoise",))["denoise"]
        assert reasons(use) == [("compile", "parity_failed"), ("eager", None)] and torch.equal(out, transformer(latents()))
        details.append(use["chain"][0]["detail"])
    assert details[0] == details[1] and details[0].startswith("max abs 0.01")
    metrics = ServiceMetrics(service=None)  # type: ignore[arg-type] - the live gauges are not read here
    request = TrackedRequest(id="r1", params=RequestParams(), clock_zero=0.0)
    request.backends["denoise"] = {"node": "transformer", **use}
    metrics.finished(request)
    (sample,) = [s for family in metrics.backend_fallbacks.collect() for s in family.samples
                 if s.name == "engine_backend_fallback_total"]
    assert sample.labels == {"node": "transformer", "stage": "denoise", "from": "compile", "to": "eager",
                             "reason": "parity_failed"} and sample.value == 1
    strict = with_backends(ToyDenoise(transformer), ToyFamily(), "t2i", "transformer", ("compile", "eager"), True,
                           LoadedComponents({"transformer": transformer}), "cpu", "/models/toy")
    with pytest.raises(StrictBackendError, match="stage 'denoise' on node 'transformer': backend compile failed with parity_failed"):
        strict.run(Size(), {"latents": latents()}, None)


def test_graph_backends_build_from_one_onnx_export(artifacts):
    run(make(["onnxruntime"]))
    (export,) = artifacts.glob("onnx/vae_decode/*/manifest.json")
    exported_at = export.stat().st_mtime_ns
    _, use = run(make(["openvino"]))
    assert use["cache"] == "built" and use["parity"]["passed"]
    assert [p.stat().st_mtime_ns for p in artifacts.glob("onnx/vae_decode/*/manifest.json")] == [exported_at]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_dynamic_artifact_serves_every_size_within_the_limits(backend, artifacts):
    def dynamic() -> BackendStage:
        return make([backend, "eager"], family=ToyFamily(dynamic=True), limits={"side": 8})

    stage = dynamic()
    image, use = run(stage, 4)
    assert use["cache"] == "built" and use["shapes"] == "1x4x2..8x2..8" and (image - eager(4)).abs().max() <= 3e-4
    image, use = run(stage, 6)  # another size: the same artifact, already loaded
    assert use["cache"] == "resident" and use["build_s"] == 0 and use["parity"]["passed"]
    assert (image - eager(6)).abs().max() <= 3e-4
    image, use = run(dynamic(), 8)  # another process, the largest size: found in the cache, not rebuilt
    assert use["cache"] == "hit" and use["build_s"] == 0 and (image - eager(8)).abs().max() <= 3e-4
    (path,) = artifacts.glob(f"{backend}/vae_decode/*/manifest.json")
    manifest = read_manifest(path.parent)
    assert manifest.key.slot.inputs == (((1, 4, -1, -1), "float32"),)
    assert manifest.range.axes == ((2, 3),) and manifest.range.smallest == ((1, 4, 2, 2),)
    assert manifest.range.optimal == ((1, 4, 4, 4),) and manifest.range.largest == ((1, 4, 8, 8),)
    assert [check.passed for check in manifest.range.parity] == [True, True]  # gated at both ends


def test_a_size_beyond_the_range_widens_it_or_falls_back(monkeypatch, artifacts):
    family = ToyFamily(dynamic=True)
    run(make(["onnxruntime", "eager"], family=family, limits={"side": 6}), 4)
    monkeypatch.setenv("ENGINE_BACKEND_BUILD", "never")
    image, use = run(make(["onnxruntime", "eager"], family=family, limits={"side": 6}), 8)
    assert reasons(use)[0][1] == "shape_unsupported" and "1x4x2..6x2..6" in use["chain"][0]["detail"]
    assert torch.equal(image, eager(8))
    monkeypatch.setenv("ENGINE_BACKEND_BUILD", "first_use")
    image, use = run(make(["onnxruntime", "eager"], family=family, limits={"side": 6}), 8)
    assert use["cache"] == "rebuilt (stale: range)" and use["shapes"] == "1x4x2..8x2..8"
    assert (image - eager(8)).abs().max() <= 3e-4 and len(list(artifacts.glob("onnxruntime/vae_decode/*/manifest.json"))) == 1


class FixedVae(ToyVae):
    """A decode whose graph fixes the latents' width (a shape read as a number): no dynamic export of it."""

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        image = torch.tanh(self.conv(torch.nn.functional.interpolate(z, scale_factor=2.0)))
        image = image * (1.0 if z.shape[3] == 4 else 0.5)
        return DecoderOutput(sample=image) if return_dict else (image,)


def test_where_the_dynamic_export_fails_each_size_gets_a_static_artifact(artifacts):
    vae = FixedVae()
    stage = make(["onnxruntime", "eager"], vae=vae, family=ToyFamily(dynamic=True), limits={"side": 8})
    for side in (4, 6):
        image, use = run(stage, side)
        assert use["used"] == "onnxruntime" and use["cache"] == "built" and use["shapes"] == "static"
        assert (image - ToyStage(vae).run(Size(side=side), {"latents": latents(side)}, None)["image"]).abs().max() <= 3e-4
    assert stage.backends["onnxruntime"].calls[0].dynamic_failure.reason.value == "build_failed"
